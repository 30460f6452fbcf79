"""Calls per core against Pipecat's, end to end, in one run on one machine.

The same Twilio Media Streams callers (``load.py --transport twilio``: one websocket each,
speech as base64 µ-law every 20 ms, at real-time pace) are played to voxphone's server and to
Pipecat's Twilio server (``pipecat_server.py``: FastAPI and uvicorn, its websocket transport,
``TwilioFrameSerializer`` with its soxr resampler to 16 kHz, a sink after the transport), each
pinned to one core, at rising numbers of calls, the two servers alternating. A server's
``capacity`` is the most calls it carried in real time on that core (``load.py``'s
``keeping_up``: handled within 20 ms at p99, the load process on time), every smaller step
included; ``capacity_ratio`` is voxphone's over Pipecat's. ``calls_per_core_ratio`` is the
same for ``load.py``'s ``calls_per_core`` (calls over the server's CPU time) at each server's
capacity: what a core would carry if all of it went to calls, which differs from capacity
where a server's latency gives out before its CPU does.

``pipecat_twilio.py`` compares the two per message, without sockets or the event loop; this
compares whole servers as a deployment runs them.

Run it with an interpreter that has pipecat-ai, FastAPI and uvicorn (not voxphone
dependencies), e.g.

    python3 -m venv --system-site-packages /tmp/pc
    /tmp/pc/bin/pip install pipecat-ai fastapi uvicorn matplotlib
    PYTHONPATH=$PWD /tmp/pc/bin/python benchmarks/pipecat_calls.py --server-cpus 0 --load-cpus 1

It writes ``benchmarks/results/pipecat_calls-<machine>.json`` and a PNG beside it (with
matplotlib; ``--plot FILE`` draws one later from a JSON it wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import cpu_model, machine_name

from voxphone.event_loop import LOOPS

SERVERS = ("voxphone", "pipecat")
HERE = Path(__file__).parent


def run(server: str, calls: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``load.py`` run; its JSON, or a stub saying it failed."""
    cmd = [sys.executable, str(HERE / "load.py"), "--transport", "twilio", "--server", server,
           "--calls", str(calls), "--seconds", str(args.seconds), "--out", str(out)]  # fmt: skip
    for flag in ("speech", "server_cpus", "load_cpus", "loop"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 180)
    if done.returncode or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"server": server, "calls": calls, "failed": tail, "keeping_up": False}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def capacity(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the most calls kept in real time, every smaller step kept too."""
    best = None
    for r in sorted(runs, key=lambda r: r["calls"]):
        if not r["keeping_up"]:
            break
        best = r
    return best


def summary(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("calls", "keeping_up", "server_cpu_cores", "calls_per_core", "failed")
    out = {k: r[k] for k in keys if k in r}
    if "packet_latency_ms" in r:
        out["p99_ms"] = r["packet_latency_ms"].get("p99")
        out["p99_ms_whole_run"] = r["packet_latency_ms_whole_run"].get("p99")
        out["loop_lag_p99_ms"] = r["loop_lag_ms"].get("p99")
        out["us_per_message"] = round(r["server_cpu_cores"] * 1e6 / (r["calls"] * 50), 1)
        out["frames"] = r["frames"]
        out["steal_pct"] = r.get("steal_pct")
    return out


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for server in SERVERS:
        runs = [r for r in result["runs"][server] if "server_cpu_cores" in r]
        ax.plot([r["calls"] for r in runs], [r["server_cpu_cores"] for r in runs], "-",
                label=f"{server}: capacity {result['capacity'][server]} calls")  # fmt: skip
        for kept, marker in ((True, "o"), (False, "x")):
            pts = [r for r in runs if r["keeping_up"] is kept]
            ax.scatter([r["calls"] for r in pts], [r["server_cpu_cores"] for r in pts],
                       marker=marker, color=ax.lines[-1].get_color())  # fmt: skip
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("concurrent Twilio calls (o: kept real time, x: did not)")
    ax.set_ylabel("server CPU (cores)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"voxphone and Pipecat, Twilio streams, one core — {result['machine']} "
        f"({result['cpu']})\nPython {result['python']}, {result.get('server_loop', 'asyncio')};"
        f" capacity ratio {result['capacity_ratio']}, calls per core ratio "
        f"{result.get('calls_per_core_ratio')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voxphone-calls", default="100,200,300,400,500,600")
    p.add_argument("--pipecat-calls", default="20,40,60,80,100,120")
    p.add_argument("--seconds", type=float, default=20.0, help="each run's length")
    p.add_argument("--speech", type=Path, default=None, help="audio file; default: flite")
    p.add_argument("--server-cpus", default=None, help="pin the servers, e.g. 0")
    p.add_argument("--load-cpus", default=None, help="pin the load processes, e.g. 1-3")
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="both servers' event loop (voxphone's default; uvicorn's, uvloop installed)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="plot this result file and exit")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    steps = {s: [int(n) for n in getattr(args, f"{s}_calls").split(",")] for s in SERVERS}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
    tmp = Path(tempfile.mkdtemp())
    load_before = os.getloadavg()
    for i in range(max(map(len, steps.values()))):
        for server in SERVERS:  # (alternating: neighbours' load falls on both alike)
            # a server that failed twice in a row has shown its limit
            if i < len(steps[server]) and sum(not r["keeping_up"] for r in runs[server][-2:]) < 2:
                r = run(server, steps[server][i], args, tmp / f"{server}-{i}.json")
                runs[server].append(r)
                print(server, json.dumps(summary(r)), flush=True)
    best = {s: capacity(runs[s]) for s in SERVERS}
    cap = {s: (b["calls"] if b else 0) for s, b in best.items()}
    per_core = {s: (b["calls_per_core"] if b else None) for s, b in best.items()}
    machine = machine_name()
    result = {
        "machine": machine,
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds_per_run": args.seconds,
        "server_cpus": args.server_cpus or "any",
        "load_cpus": args.load_cpus or "any",
        "server_loop": args.loop,
        # how load.py started the callers (random since 7d4e291; before, a grid)
        "starts": next((r["starts"] for rs in runs.values() for r in rs if "starts" in r), None),
        "pipecat_server": next(
            (r["server_software"] for r in runs["pipecat"] if "server_software" in r), None
        ),
        "capacity": cap,
        "capacity_ratio": round(cap["voxphone"] / cap["pipecat"], 2) if cap["pipecat"] else None,
        "calls_per_core_at_capacity": per_core,
        "calls_per_core_ratio": (
            round(per_core["voxphone"] / per_core["pipecat"], 2)
            if per_core["voxphone"] and per_core["pipecat"]
            else None
        ),
        "runs": {s: [summary(r) for r in runs[s]] for s in SERVERS},
    }
    out = args.out or Path(f"benchmarks/results/pipecat_calls-{machine}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("capacity", "capacity_ratio", "calls_per_core_ratio")})
    )
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
