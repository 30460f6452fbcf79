"""A vLLM ``/v1/realtime`` server written from the protocol reference, with faults on demand.

It frames audio like Voxtral does (the first step once 9000 samples have arrived, then one step per
1280 samples, 17 right-pad steps after the final commit) and "transcribes" each loud 80 ms frame
as a word, so tests can check where text lands. Each connection takes the next ``Behaviour``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field, replace
from ssl import SSLContext

import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

FIRST_STEP_SAMPLES = 9000
STEP = 1280
RIGHT_PAD_STEPS = 17


@dataclass
class Behaviour:
    blank: bool = False  # the blank-token rut: every delta empty
    drop_after_steps: int | None = None  # close the socket abruptly (server crash)
    error_after_steps: int | None = None
    error_code: str = "processing_error"
    step_delay_s: float = 0.0  # a slow server
    hang_at_end: bool = False  # the final commit gets no steps and no transcription.done


@dataclass
class Connection:
    behaviour: Behaviour
    model: str | None = None
    started: bool = False
    samples: int = 0
    steps: int = 0
    words: int = 0
    appends: int = 0
    final: bool = False
    audio: list[np.ndarray] = field(default_factory=list)


class FakeRealtimeServer:
    """``ssl``: serve ``wss://`` (and https for ``/v1/models``), at ``localhost``."""

    def __init__(
        self,
        model: str = "tinyvox",
        behaviours: list[Behaviour] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.model = model
        self.ssl = ssl
        self.behaviours = list(behaviours or [])
        self.connections: list[Connection] = []
        self.port: int | None = None
        self._server: TestServer | None = None

    @property
    def url(self) -> str:
        if self.ssl is not None:
            return f"wss://localhost:{self.port}/v1/realtime"
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/realtime", self._ws)
        app.router.add_get("/v1/models", self._models)
        self._server = TestServer(app, host="127.0.0.1", port=self.port or 0)
        await self._server.start_server(ssl=self.ssl)
        self.port = self._server.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        # A copy: the connection spends it (an error sent once), and a test's parameters are
        # shared by its runs on each event loop.
        behaviour = replace(self.behaviours.pop(0)) if self.behaviours else Behaviour()
        conn = Connection(behaviour)
        self.connections.append(conn)
        await ws.send_json({"type": "session.created", "id": f"sess-{len(self.connections)}"})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            if not await self._handle(ws, conn, json.loads(msg.data)):
                break
        return ws

    async def _handle(self, ws: web.WebSocketResponse, conn: Connection, event: dict) -> bool:  # type: ignore[type-arg]
        kind = event.get("type")
        if kind == "session.update":
            if event.get("model") != self.model:
                await ws.send_json(
                    {"type": "error", "error": "no such model", "code": "model_not_found"}
                )
                return True
            conn.model = event["model"]
        elif kind == "input_audio_buffer.commit":
            if conn.model is None:
                await ws.send_json(
                    {"type": "error", "error": "Model not validated", "code": "model_not_validated"}
                )
            elif event.get("final"):
                conn.final = True
                if conn.behaviour.hang_at_end:
                    return True
                for _ in range(RIGHT_PAD_STEPS):
                    if not await self._step(ws, conn):
                        return False
                await ws.send_json({"type": "transcription.done", "text": "", "usage": None})
            else:
                conn.started = True
        elif kind == "input_audio_buffer.append":
            pcm = np.frombuffer(base64.b64decode(event["audio"]), "<i2")
            conn.appends += 1
            conn.audio.append(pcm)
            before = conn.samples
            conn.samples += pcm.size
            for _ in range(_steps_due(before, conn.samples)):
                if not await self._step(ws, conn):
                    return False
        else:
            await ws.send_json(
                {"type": "error", "error": f"Unknown event type: {kind}", "code": "unknown_event"}
            )
        return True

    async def _step(self, ws: web.WebSocketResponse, conn: Connection) -> bool:
        """Step k writes a word when frame k was loud: Voxtral's text at step k describes the
        audio ending (k + 1) * 80 ms into the session (vllm-voxtral.md §1.4)."""
        b = conn.behaviour
        if b.step_delay_s:
            await asyncio.sleep(b.step_delay_s)
        if b.drop_after_steps is not None and conn.steps >= b.drop_after_steps:
            await ws.close()
            return False
        if b.error_after_steps is not None and conn.steps >= b.error_after_steps:
            await ws.send_json({"type": "error", "error": "boom", "code": b.error_code})
            b.error_after_steps = None
            if b.error_code != "invalid_audio":
                return True
        frame = np.concatenate(conn.audio)[conn.steps * STEP : (conn.steps + 1) * STEP]
        loud = frame.size > 0 and float(np.sqrt(np.mean(frame.astype(np.float32) ** 2))) > 300
        conn.steps += 1
        text = ""
        if loud and not b.blank:
            conn.words += 1
            text = f" w{conn.words}"
        await ws.send_json({"type": "transcription.delta", "delta": text})
        return True


def _steps_due(before: int, after: int) -> int:
    def steps(n: int) -> int:
        return 0 if n < FIRST_STEP_SAMPLES else 1 + (n - FIRST_STEP_SAMPLES) // STEP

    return steps(after) - steps(before)
