"""Soak: calls for a long time with loss and jitter, while the server's resources are sampled.

The server is voxphone's ``App`` with a null engine, in this process (as in ``load.py``); the
callers are ``load.py``'s load process: ``--calls`` callers at real-time pace, RTP PCMU from
flite speech, ``--loss`` and ``--jitter-ms`` applied, each hanging up after ``--call-seconds``
and calling again from a new address, so calls keep starting and ending. Every
``--sample-s`` seconds the server records its resident memory (``VmRSS``), open file
descriptors (``/proc/self/fd``), asyncio tasks, threads and calls up. After ``--warmup-s``,
each series is fitted with a straight line; ``growth_pct_per_hour`` is its slope over its mean
(the goal: < 1 % per hour for RSS, fds and tasks; ``flat`` says whether all three are). A
short run is dominated by per-call state that grows until a call's bounded buffers are full
(``Call`` keeps 4 minutes of frame arrival times for ``latency_ms``): judge growth on runs of
30 minutes or more, with ``--call-seconds`` short against the run. Written to
``benchmarks/results/soak-<machine>-<calls>.json``; ``--plot FILE.json`` draws the PNG beside
it (matplotlib, a separate step).

    python benchmarks/soak.py --calls 100 --minutes 3          # a short check
    python benchmarks/soak.py --calls 800 --minutes 30 --server-cpus 0 --load-cpus 1-3
    python benchmarks/soak.py --plot benchmarks/results/soak-<machine>-<calls>.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from voxphone.app import App
from voxphone.call import Call
from voxphone.heap import collector_off_the_clock

sys.path.insert(0, str(Path(__file__).parent))
from load import config, cpu_s, pin  # noqa: E402
from machine import machine_name  # noqa: E402
from webrtc_calls import NullEngine  # noqa: E402

SERIES = ("rss_mib", "fds", "tasks", "threads", "calls_up")
FLAT = ("rss_mib", "fds", "tasks")  # the soak's goal: these flat after warm-up


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Totals:
    """Frames of calls that have ended, summed as they end (no reference to a call is kept,
    which would itself be a leak)."""

    def __init__(self) -> None:
        self.calls = self.frames = self.dropped = 0

    def ended(self, call: Call) -> None:
        self.calls += 1
        self.frames += call.frames_sent
        self.dropped += call.stats.dropped_frames


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    app = App(config(args), engine=NullEngine())
    totals = Totals()
    forget = app.registry._forget

    def ended(call: Call) -> None:
        totals.ended(call)
        forget(call)

    app.registry._forget = ended  # type: ignore[method-assign]
    await app.start()
    async with collector_off_the_clock():  # as voxphone serve does
        sent = Path(tempfile.mkdtemp()) / "sent.json"
        seconds = args.minutes * 60
        cmd = [
            *(sys.executable, str(Path(__file__).parent / "load.py"), "--send", str(sent)),
            *("--calls", str(args.calls), "--seconds", str(seconds), "--ramp", str(args.ramp)),
            *("--loss", str(args.loss), "--jitter-ms", str(args.jitter_ms)),
            *("--call-seconds", str(args.call_seconds), "--ports", str(args.ports)),
            *("--base-port", str(args.base_port)),
            *(("--load-cpus", args.load_cpus) if args.load_cpus else ()),
        ]
        sender = await asyncio.create_subprocess_exec(*cmd)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        cpu0 = sum(cpu_s())
        while sender.returncode is None:
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_mib": round(rss_mib(), 2),
                    "fds": len(os.listdir("/proc/self/fd")),
                    "tasks": len(asyncio.all_tasks()),
                    "threads": threading.active_count(),
                    "calls_up": len(app.registry.calls),
                    "cpu_cores": round((sum(cpu_s()) - cpu0) / max(1e-9, time.monotonic() - t0), 3),
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sender.wait(), args.sample_s)
        await asyncio.sleep(2.5)  # the last calls time out
    await app.stop()
    return report(args, samples, totals)


def growth(
    samples: list[dict[str, float]], key: str, warmup_s: float, end_s: float
) -> dict[str, float]:
    """Straight-line fit from the warm-up to ``end_s`` (before the callers start hanging up
    for good): slope over mean, in % per hour."""
    pts = [(s["t_s"], s[key]) for s in samples if warmup_s <= s["t_s"] <= end_s]
    if len(pts) < 3:
        return {}
    t, v = np.array(pts).T
    slope = float(np.polyfit(t, v, 1)[0])
    mean = float(v.mean())
    return {
        "first": float(v[0]),
        "last": float(v[-1]),
        "min": float(v.min()),
        "max": float(v.max()),
        "slope_per_hour": round(slope * 3600, 3),
        "growth_pct_per_hour": round(slope * 3600 / mean * 100, 2) if mean else 0.0,
    }


def report(
    args: argparse.Namespace, samples: list[dict[str, float]], totals: Totals
) -> dict[str, Any]:
    warmup = args.warmup_s if args.warmup_s is not None else min(120.0, args.minutes * 60 / 4)
    end = args.minutes * 60 - args.sample_s
    trends = {k: growth(samples, k, warmup, end) for k in SERIES}
    flat = all(
        trends[k] and trends[k]["growth_pct_per_hour"] < 1.0 for k in ("rss_mib", "fds", "tasks")
    )
    return {
        "calls": args.calls,
        "minutes": args.minutes,
        "loss": args.loss,
        "jitter_ms": args.jitter_ms,
        "call_seconds": args.call_seconds,
        "engine": "null (transport + audio path only)",
        "server_cpus": args.server_cpus or "any",
        "load_cpus": args.load_cpus or "any",
        "warmup_s": warmup,
        "trend_window_s": [warmup, end],
        "calls_ended": totals.calls,
        "frames": {"to_engine": totals.frames, "dropped": totals.dropped},
        "trend_after_warmup": trends,
        "flat": flat,
        "samples": samples,
    }


def retrend(path: Path, warmup_s: float) -> dict[str, Any]:
    """Refit a result from ``warmup_s`` on, in place; also the server's CPU (cores) over the
    first and the last five minutes of that window, from the running mean each sample holds."""
    r = json.loads(path.read_text())
    samples = r["samples"]
    end = r["trend_window_s"][1]
    trends = {k: growth(samples, k, warmup_s, end) for k in SERIES}

    def cores(a: dict[str, float], b: dict[str, float]) -> float:
        used = b["cpu_cores"] * b["t_s"] - a["cpu_cores"] * a["t_s"]
        return round(used / (b["t_s"] - a["t_s"]), 3)

    window = [x for x in samples if warmup_s <= x["t_s"] <= end]
    first = [x for x in window if x["t_s"] <= window[0]["t_s"] + 300]
    last = [x for x in window if x["t_s"] >= window[-1]["t_s"] - 300]
    r["retrend"] = {
        "warmup_s": warmup_s,
        "trend": trends,
        "flat": all(trends[k] and trends[k]["growth_pct_per_hour"] < 1.0 for k in FLAT),
        "cpu_cores_first_5min": cores(first[0], first[-1]),
        "cpu_cores_last_5min": cores(last[0], last[-1]),
    }
    path.write_text(json.dumps(r, indent=2) + "\n")
    return r["retrend"]


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(path.read_text())
    t = [s["t_s"] / 60 for s in r["samples"]]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    # A refit (``--retrend``) replaces the first fit: its warm-up is the one the data needed.
    fit = r.get("retrend") or {"warmup_s": r["warmup_s"], "trend": r["trend_after_warmup"]}
    for ax, key in zip(axes, ("rss_mib", "fds", "tasks", "calls_up"), strict=True):
        ax.plot(t, [s[key] for s in r["samples"]], ".-", ms=3)
        ax.axvline(fit["warmup_s"] / 60, color="grey", ls=":", lw=1)
        g = fit["trend"].get(key) or {}
        after = f"{fit['warmup_s'] / 60:g} min"
        ax.set_title(f"{key} ({g.get('growth_pct_per_hour', '?')} %/h after {after})", fontsize=9)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"voxphone soak: {r['calls']} PCMU calls, {r['loss']:.0%} loss, {r['jitter_ms']:.0f} ms "
        f"jitter, redial every {r['call_seconds']:.0f} s — {r['machine']} "
        f"(load avg before {r['loadavg_before'][0]:.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--loss", type=float, default=0.05)
    p.add_argument("--jitter-ms", type=float, default=20.0)
    p.add_argument("--call-seconds", type=float, default=60.0, help="each caller redials after")
    p.add_argument("--ramp", type=float, default=10.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=None, help="default: a quarter, ≤ 2 min")
    p.add_argument("--ports", type=int, default=4)
    p.add_argument("--base-port", type=int, default=39800)
    p.add_argument("--server-cpus", default=None)
    p.add_argument("--load-cpus", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="draw the PNG of a result and exit")
    p.add_argument(
        "--retrend", type=Path, default=None,
        help="refit a result's trends from --warmup-s (the allocator may take minutes to settle)",
    )  # fmt: skip
    args = p.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if args.retrend:
        print(json.dumps(retrend(args.retrend, args.warmup_s or 600.0), indent=2))
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    pin(args.server_cpus)
    machine = machine_name()
    load_before = os.getloadavg()
    result = asyncio.run(serve(args))
    result = {"machine": machine, "loadavg_before": load_before, **result}
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    out = args.out or Path(f"benchmarks/results/soak-{machine}-{args.calls}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
