"""``vllm``: Voxtral Realtime on vLLM engines that voxphone starts itself, one or more per GPU.

Each engine is a worker process (``vllm_worker``) running an ``AsyncLLM``; voxphone talks to it
over a Unix socket (``worker_protocol``: raw 16 kHz PCM in, one text step per 80 ms frame out).
A new call's session goes to the worker with the fewest sessions. Several workers on one GPU
share it (run CUDA MPS so their kernels overlap instead of taking turns) and spread vLLM's
per-frame Python work over several cores — the limit of a single engine (see the README's
GPU capacity table).

Start-up: workers start together when ``kv_cache_memory_bytes`` fixes each one's KV cache (vLLM
then skips memory profiling, which cannot tell two starting engines apart) or on the CPU build;
otherwise one after another, each with ``gpu_memory_utilization / engines``. A worker that fails
to start is reported in one line — the root cause from its log — and the full log is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from voxphone.audio.codecs import Pcm
from voxphone.engines import vllm_compat
from voxphone.engines.vllm_local import preflight
from voxphone.engines.voxtral import DirectVoxtralStream, SessionFailed, Step, VoxtralSettings
from voxphone.engines.worker_protocol import (
    HEADER,
    Kind,
    decode_failure,
    decode_header,
    encode,
)
from voxphone.errors import EngineError

log = structlog.get_logger(__name__)

#: "ValueError: …", "torch.OutOfMemoryError: …" — the last line of a Python traceback, alone
#: or after vLLM's log prefix ("(EngineCore pid=7) ERROR 11-30 11:06:45 [core.py:1510] ").
_ERROR_LINE = re.compile(r"(?:^|\] )((?:[\w.]+\.)?\w*(?:Error|Exception|Exit)(?::\s.*)?)$")
#: vLLM's own summary lines, which point *at* the cause rather than naming it.
_NOT_THE_CAUSE = ("root cause", "Engine core initialization failed")


def root_cause(lines: list[str]) -> str:
    """The most specific error in a worker's log: the last traceback line that is not one of
    vLLM's "see above" summaries, else the last line, else a placeholder."""
    found = [
        m.group(1)
        for line in lines
        if (m := _ERROR_LINE.search(line.strip())) and not any(s in line for s in _NOT_THE_CAUSE)
    ]
    if found:
        return found[-1]
    tail = [line.strip() for line in lines if line.strip()]
    return tail[-1] if tail else "no output"


class WorkerSession:
    """One session on a worker, seen from voxphone (the ``Session`` protocol of ``voxtral``)."""

    def __init__(self, worker: Worker, sid: int) -> None:
        self._worker = worker
        self.sid = sid
        self.inbox: asyncio.Queue[Step | SessionFailed | None] = asyncio.Queue()

    async def send(self, frame: Pcm) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: Pcm) -> bool:
        """``DirectSession``: a frame goes into the buffer of the worker's connection, which
        ``send`` never waited on either (``SessionFailed`` if the worker is gone)."""
        self._worker.write(encode(Kind.AUDIO, self.sid, frame.astype("<i2").tobytes()))
        return True

    async def finish(self) -> None:
        if self._worker.alive:  # a lost worker has already failed the session
            self._worker.write(encode(Kind.FINISH, self.sid))

    async def abort(self) -> None:
        if self._worker.alive:
            self._worker.write(encode(Kind.ABORT, self.sid))
        self._worker.forget(self.sid)

    async def steps(self) -> AsyncIterator[Step]:
        while (item := await self.inbox.get()) is not None:
            if isinstance(item, SessionFailed):
                raise item
            yield item


class Worker:
    """One engine worker process and its connection."""

    def __init__(self, index: int, engine_args: dict[str, Any]) -> None:
        self.index = index
        #: vLLM's engine args for this worker (JSON-able; its command line carries them).
        self.args = engine_args
        self._socket = Path()
        self._logfile = Path()
        self._tail: deque[str] = deque(maxlen=400)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.sessions: dict[int, WorkerSession] = {}
        self._next_sid = 0
        self.alive = False

    async def start(self, rundir: Path) -> None:
        """Start the process and wait until its engine is up; ``EngineError`` if it dies."""
        self._socket = rundir / f"engine-{self.index}.sock"
        self._logfile = rundir / f"engine-{self.index}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Its own session: Ctrl-C in voxphone's terminal must not reach vLLM; voxphone drains
        # its calls and then stops the workers itself.
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone.engines.vllm_worker", str(self._socket),
            json.dumps(self.args), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, env=env,
        )  # fmt: skip
        self._tasks.append(asyncio.create_task(self._relay_log(), name="vllm-worker-log"))
        reader, self._writer = await self._connect()
        self.alive = True
        self._tasks.append(asyncio.create_task(self._read(reader), name="vllm-worker-read"))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wait for the socket (the worker binds it once its engine is up) or for its death."""
        assert self._proc is not None
        while self._proc.returncode is None:
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return await asyncio.open_unix_connection(str(self._socket))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 0.5)
        await asyncio.sleep(0.2)  # the last log lines
        self._keep_log()
        raise EngineError(
            f"engine 'vllm' failed to start: {root_cause(list(self._tail))} "
            f"(vLLM's log: {self._logfile})"
        )

    async def _relay_log(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            log.debug("vllm_log", engine=self.index, line=line)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = decode_header(await reader.readexactly(HEADER.size))
                payload = await reader.readexactly(header.length) if header.length else b""
                self._deliver(header.kind, header.session, payload)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self._die(f"engine worker {self.index} connection lost ({type(exc).__name__})")

    def _deliver(self, kind: Kind, sid: int, payload: bytes) -> None:
        session = self.sessions.get(sid)
        if session is None:
            return  # aborted by us; the worker's last words for it don't matter
        if kind is Kind.STEP:
            session.inbox.put_nowait(Step(payload.decode()))
        elif kind is Kind.END:
            self.forget(sid)
            session.inbox.put_nowait(None)
        elif kind is Kind.FAIL:
            message, retry = decode_failure(payload)
            self.forget(sid)
            session.inbox.put_nowait(SessionFailed(message, retry))

    def _die(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        for session in list(self.sessions.values()):  # first: nothing below may stop this
            session.inbox.put_nowait(SessionFailed(why, retry=True))
        self.sessions.clear()
        code = self._proc.returncode if self._proc is not None else None
        # What vLLM said before it went: kept in a file, its root cause in the error line.
        with contextlib.suppress(OSError):
            self._keep_log()
        log.error("vllm_engine_lost", engine=self.index, why=why, exit_code=code,
                  cause=root_cause(list(self._tail)), log=str(self._logfile))  # fmt: skip

    def _keep_log(self) -> None:
        """vLLM's last log lines into the worker's log file, for the error that names it."""
        self._logfile.write_text("\n".join(self._tail) + "\n")

    def tail(self) -> list[str]:
        """The worker's last log lines (vLLM's start-up report, errors)."""
        return list(self._tail)

    def open(self) -> WorkerSession:
        self._next_sid += 1
        session = self.sessions[self._next_sid] = WorkerSession(self, self._next_sid)
        self.write(encode(Kind.OPEN, session.sid))
        return session

    def forget(self, sid: int) -> None:
        self.sessions.pop(sid, None)

    def write(self, data: bytes) -> None:
        if self._writer is None or not self.alive:
            raise SessionFailed(f"engine worker {self.index} is not running")
        self._writer.write(data)

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.alive = False
        if self._writer is not None:
            self._writer.close()  # the worker aborts its sessions and exits
        if self._proc is not None and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, 9)
                await self._proc.wait()
        for task in self._tasks:
            task.cancel()


class VllmEngine:
    """``engines`` vLLM worker processes; one Voxtral stream per call on the least-loaded one."""

    name = "vllm"

    def __init__(
        self, engine_args: dict[str, Any], settings: VoxtralSettings, device: str, engines: int = 1
    ) -> None:
        self._args = engine_args
        self._settings = settings
        self._device = device
        self.workers = [Worker(i, self._worker_args(engines)) for i in range(engines)]
        self._rundir: Path | None = None

    def _worker_args(self, engines: int) -> dict[str, Any]:
        args = dict(self._args)
        if "gpu_memory_utilization" not in args:
            return args  # the CPU build
        if args.get("kv_cache_memory_bytes"):
            # vLLM then sizes the cache from the bytes and skips profiling, but still checks at
            # start that the utilisation's share of the GPU is free — which engines starting
            # together cannot all pass (8 engines on an H200: "Free memory … is less than
            # desired GPU memory utilization"). The check is all the value is used for.
            args["gpu_memory_utilization"] = 0.01
        else:
            args["gpu_memory_utilization"] = args["gpu_memory_utilization"] / engines
        return args

    async def start(self) -> None:
        delay = preflight(self._args, self._device)
        if delay is not None:
            self._settings = dataclasses.replace(self._settings, delay_ms=delay)
        began = time.monotonic()
        rundir = self._rundir = Path(tempfile.mkdtemp(prefix="voxphone-vllm-"))
        log.info("vllm_starting", version=vllm_compat.installed_version(),
                 engines=len(self.workers), **self._args)  # fmt: skip
        try:
            # vLLM's memory profiling needs the GPU to itself while it measures; a fixed KV size
            # skips it, and the CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE.
            profiles = self._device == "cuda" and not self._args.get("kv_cache_memory_bytes")
            if len(self.workers) == 1 or not profiles:
                await asyncio.gather(*(w.start(rundir) for w in self.workers))
            else:
                for worker in self.workers:
                    await worker.start(rundir)
        except BaseException:
            await self.stop()
            raise
        log.info("engine_started", engine=self.name, engines=len(self.workers),
                 seconds=round(time.monotonic() - began, 1))  # fmt: skip

    @property
    def problem(self) -> str | None:
        """Why no call can be transcribed (every worker has exited), for ``/ready``; else None.
        Calls then end ``engine_error``: a load balancer should send them elsewhere."""
        if self._rundir is None or any(w.alive for w in self.workers):
            return None
        logs = sorted(str(f) for f in self._rundir.glob("engine-*.log"))
        return (
            f"every vLLM engine worker ({len(self.workers)}) has exited; restart voxphone "
            f"(vLLM's logs: {', '.join(logs) or 'none kept'})"
        )

    async def open_stream(self, call_id: str) -> DirectVoxtralStream:
        stream = DirectVoxtralStream(self._open_session, self._settings, call_id)
        await stream.start()
        return stream

    async def _open_session(self) -> WorkerSession:
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise SessionFailed("no vLLM engine worker is running", retry=False)
        return min(alive, key=lambda w: len(w.sessions)).open()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))
        if self._rundir is not None and not any(self._rundir.glob("*.log")):
            shutil.rmtree(self._rundir, ignore_errors=True)  # a failed start's log stays
