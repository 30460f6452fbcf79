"""``vllm-remote``: Voxtral Realtime behind ``vllm serve``, over its ``/v1/realtime`` websocket.

One websocket per session. Sessions go to the configured server with the fewest live sessions
(round-robin among equals); a server that refuses a connection is skipped for the next one, so
calls scale out over several ``vllm serve`` instances with no router in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog

from voxphone.audio.codecs import Pcm
from voxphone.engines import realtime_protocol as rp
from voxphone.engines.voxtral import SessionFailed, Step, VoxtralSettings, VoxtralStream
from voxphone.errors import EngineError

log = structlog.get_logger(__name__)

#: Pauses between rounds of connection attempts over all servers.
CONNECT_BACKOFF_S = (0.25, 1.0, 2.0, 0.0)


@dataclass
class Server:
    url: str
    active: int = 0
    failures: int = 0

    @property
    def http_base(self) -> str:
        base = self.url.split("/v1/", 1)[0]
        return base.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


class RemoteSession:
    """One ``/v1/realtime`` connection, from ``session.created`` to ``transcription.done``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, server: Server, idle_s: float) -> None:
        self._ws = ws
        self._server = server
        self._idle_s = idle_s
        self._released = False
        server.active += 1

    @classmethod
    async def connect(
        cls, http: aiohttp.ClientSession, server: Server, model: str, timeout_s: float
    ) -> RemoteSession:
        try:
            async with asyncio.timeout(timeout_s):
                ws = await http.ws_connect(
                    server.url, timeout=aiohttp.ClientWSTimeout(ws_close=timeout_s)
                )
        except TimeoutError:
            raise SessionFailed(f"{server.url}: cannot connect within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SessionFailed(f"{server.url}: cannot connect: {exc}") from exc
        try:
            async with asyncio.timeout(timeout_s):
                first = await ws.receive()
            if first.type != aiohttp.WSMsgType.TEXT or not isinstance(
                rp.parse(first.data), rp.SessionCreated
            ):
                raise SessionFailed(
                    f"{server.url}: expected session.created, got {first.data!r:.200}"
                )
            await ws.send_str(rp.session_update(model))
            await ws.send_str(rp.commit())
        except (TimeoutError, aiohttp.ClientError, ConnectionError, EngineError) as exc:
            await ws.close()
            if isinstance(exc, SessionFailed):
                raise
            raise SessionFailed(f"{server.url}: session set-up failed: {exc!r}") from exc
        return cls(ws, server, timeout_s * 6)

    async def send(self, frame: Pcm) -> None:
        try:
            await self._ws.send_str(rp.append(frame))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise SessionFailed(f"{self._server.url}: send failed: {exc}") from exc

    async def finish(self) -> None:
        if not self._ws.closed:
            # A broken connection is reported by the reader.
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await self._ws.send_str(rp.commit(final=True))

    async def abort(self) -> None:
        await self._ws.close()
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._server.active -= 1

    async def steps(self) -> AsyncIterator[Step]:
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_s):
                        msg = await self._ws.receive()
                except TimeoutError:
                    raise SessionFailed(
                        f"{self._server.url}: no message for {self._idle_s:g} s"
                    ) from None
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise SessionFailed(
                        f"{self._server.url}: connection closed before transcription.done "
                        f"({msg.type.name})"
                    )
                event = rp.parse(msg.data)
                if isinstance(event, rp.Delta):
                    yield Step(event.text)
                elif isinstance(event, rp.Done):
                    return
                elif isinstance(event, rp.ServerError):
                    self._on_error(event)
        except EngineError as exc:
            if isinstance(exc, SessionFailed):
                raise
            raise SessionFailed(f"{self._server.url}: {exc}") from exc
        finally:
            await self._ws.close()
            self._release()

    def _on_error(self, err: rp.ServerError) -> None:
        where = f"{self._server.url}: server error {err.code or '(no code)'}: {err.message}"
        if err.action is rp.ErrorAction.CONTINUE:
            log.warning("realtime_error_ignored", server=self._server.url, code=err.code)
            return
        raise SessionFailed(where, retry=err.action is rp.ErrorAction.RECONNECT)


class VllmRemoteEngine:
    """Sessions spread over one or more ``vllm serve`` realtime endpoints."""

    name = "vllm-remote"

    def __init__(
        self, urls: list[str], model: str, settings: VoxtralSettings, connect_timeout_s: float = 5.0
    ) -> None:
        if not urls:
            raise EngineError("engine.vllm_remote.urls: at least one server URL is needed")
        self.servers = [Server(u) for u in urls]
        self._model = model
        self._settings = settings
        self._timeout = connect_timeout_s
        self._rr = itertools.count()
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Check that some server is up and serves the model (others may come later)."""
        # One websocket per call: aiohttp's default pool of 100 connections would hold the 101st
        # call's connect until another call ends (calls are bounded by ``calls.max_concurrent``).
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        problems = [p for s in self.servers if (p := await self._check(s))]
        if len(problems) == len(self.servers):
            await self.stop()
            raise EngineError("no vLLM realtime server is usable:\n  " + "\n  ".join(problems))
        for p in problems:
            log.warning("vllm_server_unusable", problem=p)
        log.info("engine_started", engine=self.name, servers=[s.url for s in self.servers])

    async def _check(self, server: Server) -> str | None:
        assert self._http is not None
        url = f"{server.http_base}/v1/models"
        try:
            async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=self._timeout)) as r:
                body = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"{url}: {type(exc).__name__}: {exc}"
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if self._model not in served:
            return f"{url}: model {self._model!r} is not served (served: {served})"
        return None

    async def open_stream(self, call_id: str) -> VoxtralStream:
        stream = VoxtralStream(self._open_session, self._settings, call_id)
        await stream.start()
        return stream

    async def _open_session(self) -> RemoteSession:
        """Connect to the least-loaded server, falling back to the others in turn."""
        assert self._http is not None, "engine not started"
        turn = next(self._rr)
        order = sorted(
            range(len(self.servers)),
            key=lambda i: (self.servers[i].active, (i - turn) % len(self.servers)),
        )
        errors = []
        for pause in CONNECT_BACKOFF_S:
            for i in order:
                server = self.servers[i]
                try:
                    return await RemoteSession.connect(
                        self._http, server, self._model, self._timeout
                    )
                except SessionFailed as exc:
                    server.failures += 1
                    errors.append(str(exc))
            await asyncio.sleep(pause)  # a restarting server is back within seconds
        raise SessionFailed("no realtime server accepted the session: " + "; ".join(errors[-3:]))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
