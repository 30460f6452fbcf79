"""How many real-time calls one GPU carries, per engine design, at what lag.

Ramps concurrent calls (e.g. 16 → 512) through one engine design and measures each level:

* every call sends one 80 ms frame of 16 kHz audio every 80 ms (its own phase: real calls do not
  start on a shared tick) for ``--seconds``; calls start spread over ``--ramp-s``;
* **lag** of step ``j`` = the time step ``j`` came back − the time frame ``j + 7`` was sent: step
  ``j`` covers frames up to ``j + 6`` (7 frames at the model's 480 ms delay, then one per frame)
  plus 2.5 ms of look-ahead into frame ``j + 7`` (tekken.json ``streaming_look_ahead_ms``), so it
  cannot run before that frame arrives. Lag is what the engine adds beyond the model's delay.
  Reported over the steady state (frames sent after every call of the level had started) and
  over all steps;
* GPU memory and busy % (``nvidia-smi``), CPU % of this process and of each child process
  (engine workers, EngineCores, ``vllm serve``), sampled over the steady state.

A level "keeps up" when steady-state lag p99 ≤ 200 ms and every step came back. The ramp stops
after the first level whose p99 exceeds 2 s (further levels only fall further behind).

Designs (``--path``):

* ``local``: voxphone's old in-process ``AsyncLLM`` (``VllmLocalEngine``), the baseline;
* ``pool``: voxphone's ``vllm`` engine, ``--engines N`` worker processes sharing the GPU;
* ``remote``: ``vllm serve`` (started here with the model card's flags) driven by voxphone's
  ``vllm-remote`` engine.

Results go to ``--out`` as JSON naming the card, the driver, vLLM's version and the CPU; ``--plot
FILE…`` turns result JSONs into a PNG beside them (matplotlib, where the GPU host has none).

    python benchmarks/gpu_capacity.py --path pool --engines 8 --model /tmp/voxtral-dummy \
        --levels 64,128,256,384 --out benchmarks/results/gpu_capacity-pool.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from voxphone.engines import vllm_compat
from voxphone.engines.voxtral import Session, VoxtralSettings

FRAME_S = 0.08
FIRST_STEP_FRAMES = 7  # 480 ms delay: the first step needs 7 frames, then one per frame
LAG_DEFINITION = "step j came back - frame j+7 sent"
KEEPS_UP_MS = 200
GIVE_UP_MS = 2000


def engine_args(a: argparse.Namespace, seqs: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": a.model, "tokenizer_mode": "mistral", "config_format": "mistral",
        "load_format": "dummy", "max_model_len": a.max_model_len, "max_num_seqs": seqs,
        "limit_mm_per_prompt": {"audio": 1},
        "compilation_config": {"cudagraph_mode": a.cudagraph_mode},
        "gpu_memory_utilization": a.gpu_memory_utilization,
    }  # fmt: skip
    if a.kv_cache_memory_bytes:
        args["kv_cache_memory_bytes"] = a.kv_cache_memory_bytes
    if a.max_num_batched_tokens:
        args["max_num_batched_tokens"] = a.max_num_batched_tokens
    if a.kv_cache_dtype != "auto":
        args["kv_cache_dtype"] = a.kv_cache_dtype
    if a.async_scheduling != "auto":
        args["async_scheduling"] = a.async_scheduling == "on"
    if a.device == "cpu":  # vLLM's CPU build: tests and trying this script out
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args.update(enforce_eager=True, dtype="bfloat16")
        del args["compilation_config"], args["gpu_memory_utilization"]
    return args


async def make_engine(a: argparse.Namespace) -> Any:
    settings = VoxtralSettings(max_model_len=a.max_model_len)
    top = max(a.levels)
    if a.path == "local":
        from voxphone.engines.vllm_local import VllmLocalEngine

        return VllmLocalEngine(engine_args(a, top + 8), settings, a.device)
    if a.path == "pool":
        from voxphone.engines.vllm_pool import VllmEngine

        share = -(-top // a.engines) + 8
        return VllmEngine(engine_args(a, share), settings, a.device, engines=a.engines)
    from voxphone.engines.vllm_remote import VllmRemoteEngine

    return VllmRemoteEngine([a.url], a.served_name, settings, connect_timeout_s=30)


def start_vllm_serve(a: argparse.Namespace) -> subprocess.Popen[bytes]:
    """``vllm serve`` with the model card's flags (PIECEWISE cudagraphs, mistral formats)."""
    port = a.url.split(":")[2].split("/")[0]
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model,
        "--served-model-name", a.served_name, "--tokenizer-mode", "mistral",
        "--config-format", "mistral", "--load-format", "dummy",
        "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(max(a.levels) + 8),
        "--gpu-memory-utilization", str(a.gpu_memory_utilization),
        "--compilation-config", json.dumps({"cudagraph_mode": a.cudagraph_mode}),
        "--host", "127.0.0.1", "--port", port, "--kv-cache-dtype", a.kv_cache_dtype,
    ]  # fmt: skip
    log = Path(a.out).with_suffix(".serve.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_served(a: argparse.Namespace, proc: subprocess.Popen[bytes]) -> None:
    import aiohttp

    base = a.url.replace("ws://", "http://").split("/v1/")[0]
    async with aiohttp.ClientSession() as http:
        while proc.poll() is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(1)
    raise SystemExit(f"vllm serve exited with {proc.returncode}")


# -- one call ------------------------------------------------------------------------------


class Call:
    """Sends frames on its own 80 ms clock and timestamps every step that comes back."""

    def __init__(self, session: Session, frames: int, start: float) -> None:
        self.session = session
        self.frames = frames
        self.start = start
        self.sent: list[float] = []
        self.steps: list[float] = []

    async def send(self, audio: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self.start - loop.time()))
        for i in range(self.frames):
            await asyncio.sleep(max(0.0, self.start + i * FRAME_S - loop.time()))
            self.sent.append(loop.time())
            await self.session.send(audio[i % len(audio)])
        await self.session.finish()

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        async for _ in self.session.steps():
            self.steps.append(loop.time())

    def lags_ms(self, since: float) -> tuple[list[float], list[float]]:
        """(steady-state lags, all lags) of the steps answering real audio."""
        every, steady = [], []
        for j, done in enumerate(self.steps):
            k = j + FIRST_STEP_FRAMES  # the frame holding step j's look-ahead
            if k >= len(self.sent):
                break  # right-pad flush steps answer no caller audio
            lag = (done - self.sent[k]) * 1000
            every.append(lag)
            if self.sent[k] >= since:
                steady.append(lag)
        return steady, every


# -- what the machine does meanwhile -------------------------------------------------------


def nvidia_smi(query: str) -> list[float]:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [float(v) for v in out.split(",")[:4] if v.strip()]


def cpu_times() -> dict[str, float]:
    """CPU seconds of this process and each descendant, keyed ``name[pid]``."""
    try:
        import psutil  # a vLLM dependency
    except ImportError:
        return {}

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[f"{p.name()}[{p.pid}]"] = t.user + t.system
    return out


class Sampler:
    """GPU busy % every half second, CPU % per process between ``begin`` and ``end``."""

    def __init__(self) -> None:
        self.busy: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}

    def begin(self) -> None:
        self._t0, self._cpu0 = time.monotonic(), cpu_times()
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            busy = await asyncio.to_thread(nvidia_smi, "utilization.gpu")
            self.busy += busy[:1]
            await asyncio.sleep(0.5)

    def end(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
        wall = time.monotonic() - self._t0
        cpu1 = cpu_times()
        per = {k: round(100 * (v - self._cpu0.get(k, 0.0)) / wall) for k, v in cpu1.items()}
        mem = nvidia_smi("memory.used,memory.total")
        return {
            "cpu_percent": {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v},
            "gpu_busy_percent_mean": round(statistics.fmean(self.busy), 1) if self.busy else None,
            "gpu_memory_used_mib": mem[0] if mem else None,
            "gpu_memory_total_mib": mem[1] if len(mem) > 1 else None,
        }


# -- what vLLM says and where its processes spend their time -------------------------------

KV_USAGE = re.compile(r"Running: (\d+) reqs.*KV cache usage: ([\d.]+)%")


class VllmLog:
    """vLLM's periodic stats lines ("Running: N reqs, … GPU KV cache usage: X%"), from every
    engine worker's log tail (``pool``) or ``vllm serve``'s log file (``remote``)."""

    def __init__(self, engine: Any, serve_log: Path | None) -> None:
        self._engine = engine
        self._serve_log = serve_log
        self._seen: set[str] = set()

    def _lines(self) -> list[str]:
        if self._serve_log is not None:
            return self._serve_log.read_text(errors="replace").splitlines()
        return [line for w in getattr(self._engine, "workers", []) for line in w.tail()]

    def new(self) -> list[tuple[int, float]]:
        """``(running requests, KV usage %)`` of every stats line since the last call."""
        out = []
        for line in self._lines():
            if line in self._seen:
                continue
            self._seen.add(line)
            if m := KV_USAGE.search(line):
                out.append((int(m[1]), float(m[2])))
        return out


def children() -> list[Any]:
    import psutil  # a vLLM dependency

    return psutil.Process().children(recursive=True)


async def profile(a: argparse.Namespace, calls: int) -> dict[str, Any]:
    """``py-spy record`` (raw collapsed stacks) of one EngineCore and one engine worker or API
    server for ``--profile-s`` seconds, summarised as the functions with the most samples
    (inclusive, as % of the process's samples) — the "where does the time go" answer."""
    import shutil

    spy = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
    procs = children()
    core = next((p for p in procs if "EngineCore" in p.name()), None)
    front = next((p for p in procs if "EngineCore" not in p.name() and p.name() != "nvidia-smi"
                  and "resource_tracker" not in " ".join(p.cmdline())), None)  # fmt: skip
    out: dict[str, Any] = {"calls": calls, "seconds": a.profile_s}
    for role, proc in (("engine_core", core), ("frontend", front)):
        if proc is None:
            continue
        raw = Path(a.out).with_suffix(f".{role}.txt")
        cmd = [spy, "record", "--pid", str(proc.pid), "--duration", str(a.profile_s), "--rate",
               "100", "--nonblocking", "--format", "raw", "--output", str(raw)]  # fmt: skip
        p = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await p.communicate()
        out[role] = {"pid": proc.pid, "name": proc.name(), **summarise(raw, err.decode()[-300:])}
    return out


def summarise(raw: Path, err: str) -> dict[str, Any]:
    """Top functions by inclusive and by self samples from py-spy's collapsed stacks."""
    if not raw.exists():
        return {"error": err.strip()}
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n_str = line.rpartition(" ")
        if not stack or not n_str.isdigit():
            continue
        n = int(n_str)
        total += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
                  for f in stack.split(";")]  # fmt: skip
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n

    def top(d: dict[str, int], k: int) -> list[list[Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [[f, round(100 * n / total, 1)] for f, n in ranked]

    return {"samples": total, "inclusive_percent": top(inclusive, 40), "self_percent": top(own, 25)}


# -- one level -----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q)), 1)


async def run_level(
    engine: Any, n: int, a: argparse.Namespace, vlog: VllmLog, seconds: float | None = None
) -> dict[str, Any]:
    """One level: ``n`` calls of ``seconds`` (``--seconds``) each, measured as the module says."""
    loop = asyncio.get_running_loop()
    vlog.new()  # forget what came before this level
    rng = np.random.default_rng(n)
    audio = [rng.normal(0, 3000, 1280).astype(np.int16) for _ in range(25)]
    frames = round((seconds or a.seconds) / FRAME_S)
    t0 = loop.time() + 1.0
    calls = []
    for _ in range(n):
        start = t0 + random.uniform(0, a.ramp_s)
        calls.append(Call(await engine._open_session(), frames, start))
    steady_from = t0 + a.ramp_s + FRAME_S
    sampler = Sampler()
    sampler.begin()
    tasks = [asyncio.create_task(c.receive()) for c in calls]
    kv_timeline: list[list[float]] = []

    async def watch_kv() -> None:  # vLLM logs its stats every VLLM_LOG_STATS_INTERVAL s
        while True:
            await asyncio.sleep(1)
            for running, usage in vlog.new():
                kv_timeline.append([round(loop.time() - t0, 1), running, usage])

    watcher = asyncio.create_task(watch_kv())
    spied: asyncio.Task[dict[str, Any]] | None = None
    if n == a.profile_at:  # in the steady state; the senders must not wait for it

        async def spy_later() -> dict[str, Any]:
            await asyncio.sleep(max(0.0, steady_from + 1.0 - loop.time()))
            return await profile(a, n)

        spied = asyncio.create_task(spy_later())
    await asyncio.gather(*(c.send(audio) for c in calls))
    machine = sampler.end()  # steady state: every call sending
    watcher.cancel()
    done, late = await asyncio.wait(tasks, timeout=60)
    for t in late:
        t.cancel()
    for c in calls:
        with contextlib.suppress(Exception):
            await c.session.abort()
    steady: list[float] = []
    every: list[float] = []
    for c in calls:
        s, e = c.lags_ms(steady_from)
        steady += s
        every += e
    expected = n * (frames - FIRST_STEP_FRAMES)
    result = {
        "calls": n,
        "lag_ms": {"p50": pct(steady, 50), "p99": pct(steady, 99), "max": pct(steady, 100)},
        "lag_ms_all_steps": {"p50": pct(every, 50), "p99": pct(every, 99), "max": pct(every, 100)},
        "steps_answered": len(every),
        "steps_expected": expected,
        "failed_calls": sum(1 for t in done if t.exception() is not None) + len(late),
        "errors": sorted(
            {repr(t.exception())[:300] for t in done if t.exception() is not None}
            | ({"no end within 60 s"} if late else set())
        )[:5],  # fmt: skip
        **machine,
        # [s since the first call, requests running, KV cache usage %] per engine stats line
        "kv_cache_usage": kv_timeline,
        "kv_cache_usage_percent_max": max((u for _, _, u in kv_timeline), default=None),
    }
    if spied is not None:
        result["profile"] = await spied
    p99 = result["lag_ms"]["p99"]
    result["keeps_up"] = bool(p99 is not None and p99 <= KEEPS_UP_MS and len(every) == expected)
    return result


def machine_info() -> dict[str, Any]:
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    ).stdout.strip() if _has("nvidia-smi") else "none"  # fmt: skip
    return {
        "gpu": gpu,
        "vllm": vllm_compat.installed_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
    }


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


async def main(a: argparse.Namespace) -> None:
    serve = None
    if a.path == "remote" and a.start_server:
        serve = start_vllm_serve(a)
    began = time.monotonic()
    engine = await make_engine(a)
    try:
        if serve is not None:
            await wait_served(a, serve)
        await engine.start()
        ready_s = round(time.monotonic() - began, 1)
        print(f"{a.path}: engine ready in {ready_s} s", flush=True)
        kv_lines = [
            line
            for w in getattr(engine, "workers", [])
            for line in w.tail()
            if "KV cache size" in line or "Maximum concurrency" in line
        ]
        report: dict[str, Any] = {
            "benchmark": "gpu_capacity", "path": a.path, "engines": a.engines,
            "machine": machine_info(), "ready_s": ready_s, "seconds_per_call": a.seconds,
            "max_model_len": a.max_model_len, "cudagraph_mode": a.cudagraph_mode,
            "lag": LAG_DEFINITION,
            "kv_cache_memory_bytes": a.kv_cache_memory_bytes, "vllm_kv_log": kv_lines,
            "kv_cache_dtype": a.kv_cache_dtype, "async_scheduling": a.async_scheduling,
            "levels": [],
        }  # fmt: skip
        serve_log = Path(a.out).with_suffix(".serve.log") if serve is not None else None
        vlog = VllmLog(engine, serve_log)
        for n in a.levels:
            level = await run_level(engine, n, a, vlog)
            report["levels"].append(level)
            print(json.dumps(level), flush=True)
            Path(a.out).write_text(json.dumps(report, indent=1))  # noqa: ASYNC240 (between levels)
            p99 = level["lag_ms"]["p99"]
            if p99 is None or p99 > GIVE_UP_MS:
                break
            await asyncio.sleep(2)  # let aborted sessions leave the engine
        if a.long:  # long calls: how KV use grows once the encoder's window is full
            report["long"] = await run_level(engine, a.long, a, vlog, a.long_seconds)
            print(json.dumps({k: v for k, v in report["long"].items() if k != "profile"}))
            Path(a.out).write_text(json.dumps(report, indent=1))  # noqa: ASYNC240
    finally:
        await engine.stop()
        if serve is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, 15)


def plot(files: list[str]) -> None:
    """One PNG of lag p99 against calls, a line per result file, beside the first file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    reports = [json.loads(Path(f).read_text()) for f in files]
    label = {"local": "in-process AsyncLLM (old)", "remote": "vllm serve via vllm-remote"}
    for r in reports:
        # Early runs measured lag against frame j+6: 80 ms more than against j+7.
        offset = 80 if "j+6" in r.get("lag", "") else 0
        xs = [lv["calls"] for lv in r["levels"]]
        ys = [lv["lag_ms"]["p99"] - offset for lv in r["levels"]]
        name = label.get(r["path"], f"voxphone vllm, {r['engines']} engines")
        if r["path"] == "pool" and r.get("async_scheduling", "auto") != "off":
            name += ", vLLM's async scheduling"
        if r.get("kv_cache_dtype") == "fp8":
            name += ", fp8 KV cache"
        ax.plot(xs, ys, marker="o", label=name)
        levels = zip(xs, ys, r["levels"], strict=True)
        failed = [(x, y) for x, y, lv in levels if lv["failed_calls"]]
        if failed:
            ax.scatter(*zip(*failed, strict=True), marker="x", s=90, color="black", zorder=3)
    ax.scatter([], [], marker="x", color="black", label="calls did not finish (KV cache full)")
    ax.axhline(KEEPS_UP_MS, color="grey", linestyle="--", label="200 ms target")
    m = reports[0]["machine"]
    ax.set(xscale="log", yscale="log", xlabel="concurrent real-time calls")
    ticks = sorted({lv["calls"] for r in reports for lv in r["levels"]})
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set(ylabel="steady-state lag p99, ms (step j - frame j+7)")
    ax.set_title(f"Voxtral Mini 4B Realtime dims, {m['gpu'].split(',')[0]}, vLLM {m['vllm']}")
    ax.legend(fontsize=8)
    out = Path(files[0]).with_name(f"gpu_capacity-{m['gpu'].split(',')[0].split()[-1].lower()}.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(out)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--path", choices=["local", "pool", "remote"], default="pool")
    p.add_argument("--engines", type=int, default=1, help="pool: worker processes")
    p.add_argument("--model", default="/tmp/voxtral-dummy")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32])
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--ramp-s", type=float, default=2.0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--cudagraph-mode", default="PIECEWISE")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's: auto (bf16) or fp8")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--profile-at", type=int, default=0, help="py-spy at this many calls")
    p.add_argument("--profile-s", type=int, default=8)
    p.add_argument("--long", type=int, default=0, help="then this many long calls")
    p.add_argument("--long-seconds", type=float, default=60.0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--url", default="ws://127.0.0.1:8123/v1/realtime")
    p.add_argument("--served-name", default="voxtral")
    p.add_argument("--start-server", action="store_true", help="remote: start vllm serve")
    p.add_argument("--out", default="gpu_capacity.json")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the PNG")
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    if args.plot:
        plot(args.plot)
    else:
        from voxphone.logging import configure

        configure("warning", "console")
        asyncio.run(main(args))
