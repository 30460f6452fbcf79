"""One vLLM engine worker: ``python -m voxphone.engines.vllm_worker SOCKET ENGINE_ARGS_JSON``.

The worker starts an ``AsyncLLM`` (which forks its own EngineCore), then listens on the Unix
socket ``SOCKET``: the socket appearing is the "ready" signal. It serves one connection — from the
voxphone process that started it — speaking ``worker_protocol``, one ``LocalSession`` per
``OPEN``. When that connection closes (voxphone stopped or died) every session is aborted and
the worker exits.

Why a process per engine rather than ``AsyncLLM`` inside voxphone: each Voxtral session costs
Python work per 80 ms frame on both sides of vLLM (prompt rendering here, scheduling in
EngineCore), so one process pair saturates two cores long before the GPU is busy; several workers
share the GPU and spread that work over cores. A fresh interpreter also cannot inherit CUDA state
from voxphone, and its stderr is a pipe voxphone reads, so a failed start becomes one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

import numpy as np

from voxphone.engines import vllm_compat
from voxphone.engines.vllm_local import LocalSession
from voxphone.engines.voxtral import SessionFailed
from voxphone.engines.worker_protocol import (
    HEADER,
    Kind,
    decode_header,
    encode,
    encode_failure,
)


class Connection:
    """The sessions of one voxphone connection, driven by its messages."""

    def __init__(self, engine: Any, writer: asyncio.StreamWriter) -> None:
        self._engine = engine
        self._writer = writer
        self._sessions: dict[int, LocalSession] = {}
        self._pumps: dict[int, asyncio.Task[None]] = {}

    async def serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = decode_header(await reader.readexactly(HEADER.size))
                payload = await reader.readexactly(header.length) if header.length else b""
                await self._dispatch(header.kind, header.session, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # voxphone closed the connection
        finally:
            for session in list(self._sessions.values()):
                await session.abort()
            for pump in self._pumps.values():
                pump.cancel()

    async def _dispatch(self, kind: Kind, sid: int, payload: bytes) -> None:
        if kind is Kind.OPEN:
            session = self._sessions[sid] = LocalSession(self._engine)
            self._pumps[sid] = asyncio.create_task(self._pump(sid, session))
            return
        session_or_none = self._sessions.get(sid)
        if session_or_none is None:
            return  # already ended: late audio after END/FAIL is harmless
        if kind is Kind.AUDIO:
            await session_or_none.send(np.frombuffer(payload, dtype="<i2"))
        elif kind is Kind.FINISH:
            await session_or_none.finish()
        elif kind is Kind.ABORT:
            self._sessions.pop(sid, None)
            await session_or_none.abort()

    async def _pump(self, sid: int, session: LocalSession) -> None:
        try:
            async for step in session.steps():
                self._writer.write(encode(Kind.STEP, sid, step.text.encode()))
            self._writer.write(encode(Kind.END, sid))
        except SessionFailed as exc:
            self._writer.write(encode_failure(sid, str(exc), exc.retry))
        finally:
            self._sessions.pop(sid, None)
            self._pumps.pop(sid, None)


async def run(socket_path: str, engine_args: dict[str, Any]) -> None:
    # vLLM's own log lines go to our stderr, which voxphone reads and relays.
    engine = vllm_compat.create_engine(**engine_args)
    closed = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await Connection(engine, writer).serve(reader)
        finally:
            closed.set()

    server = await asyncio.start_unix_server(on_connect, path=socket_path)
    stats = asyncio.create_task(vllm_compat.log_stats_every(engine))
    try:
        await closed.wait()
    finally:
        stats.cancel()
        server.close()
        engine.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def main() -> None:
    socket_path, args = sys.argv[1], json.loads(sys.argv[2])
    asyncio.run(run(socket_path, args))


if __name__ == "__main__":
    main()
