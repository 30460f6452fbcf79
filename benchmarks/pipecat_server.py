"""Pipecat's Twilio media-stream server, the peer ``load.py --server pipecat`` plays calls to.

It is what Pipecat's Twilio examples run, with nothing after the transport and the pipeline's
input at 16 kHz (the examples take 8 kHz, for speech services that take telephone audio; 16 kHz
is what voxphone hands its model, so both sides resample): a FastAPI
websocket endpoint under uvicorn reads Twilio's ``connected`` and ``start`` messages (as
``pipecat.runner.utils.parse_telephony_websocket`` does), then runs one pipeline per call:
``FastAPIWebsocketTransport.input()`` with Pipecat's ``TwilioFrameSerializer`` (JSON, base64,
µ-law decode and its soxr stream resampler to the pipeline's 16 kHz, the rate voxphone hands
its engine) and a sink that counts the audio and drops it, as ``load.py``'s null engine does for
voxphone. The pipeline is Pipecat's leanest: no RTVI, no turn tracking, no idle timeout (its
defaults add all three, which cost more), so the comparison is the strictest for voxphone.

The server runs in ``load.py``'s process and event loop, as voxphone's ``App`` does, so both are
measured the same way (the process's CPU time over the window when every call is up). Pipecat is
not a voxphone dependency: run ``load.py`` with an interpreter that has pipecat-ai, FastAPI and
uvicorn, e.g. ``pip install pipecat-ai fastapi uvicorn`` in a separate venv.
"""

import asyncio
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

#: Where load.py's callers connect (its Twilio ``<Stream url>``).
PATH = "/ws"


@dataclass
class _Stats:
    dropped_frames: int = 0  # (Pipecat's pipeline queues are unbounded: it drops none)


@dataclass
class PeerCall:
    """What ``load.py`` reads of a call (``voxphone.call.Call``'s names): its ``callSid``,
    whether it is up, and the 80 ms of audio it handed on, counted from Pipecat's frames."""

    call_id: str
    end_reason: str | None = None
    samples: int = 0  # at 16 kHz
    stats: _Stats = field(default_factory=_Stats)

    @property
    def frames_sent(self) -> int:
        return self.samples // 1280


@functools.cache
def _sink() -> Any:
    """The pipeline's last processor (made once: Pipecat is imported only when it runs)."""
    from pipecat.frames.frames import InputAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

    class Sink(FrameProcessor):  # type: ignore[misc]
        """Counts ``call``'s audio and drops it, as voxphone's null engine does; passes every
        other frame on (the pipeline's start and end)."""

        def __init__(self, call: PeerCall) -> None:
            super().__init__()
            self._call = call

        async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                self._call.samples += len(frame.audio) // 2
            else:
                await self.push_frame(frame, direction)

    return Sink


def instrument(
    handled: dict[tuple[int | str, int], float], fed: dict[Any, int], every: int
) -> None:
    """Stamp sampled messages as ``load.py``'s ``Probe`` does for voxphone: wrap
    ``TwilioFrameSerializer.deserialize`` (per message, awaited by the transport's receive
    loop) and key every ``every``-th text message of a stream (``connected`` and ``start``
    count) by the call's ``callSid`` and that number."""
    from pipecat.serializers.twilio import TwilioFrameSerializer

    deserialize = TwilioFrameSerializer.deserialize

    async def stamped(self: TwilioFrameSerializer, data: str | bytes) -> Any:
        frame = await deserialize(self, data)
        n = fed[self] = fed[self] + 1
        if n % every == 0:
            handled[(self._call_sid, n)] = time.monotonic()
        return frame

    TwilioFrameSerializer.deserialize = stamped  # type: ignore[method-assign]


class PipecatServer:
    """uvicorn serving Pipecat's Twilio endpoint on 127.0.0.1:``port``, in this event loop.
    ``calls``: every call it opened; ``fed``: text messages read per stream (``Probe.fed``)."""

    def __init__(self, port: int, fed: dict[Any, int]) -> None:
        import uvicorn
        from fastapi import FastAPI, WebSocket
        from loguru import logger  # Pipecat's: warnings only, as load.py sets voxphone's logs

        logger.remove()
        logger.add(sys.stderr, level="WARNING")

        self.port, self.calls, self._fed = port, list[PeerCall](), fed
        app = FastAPI()

        @app.websocket(PATH)
        async def media_stream(websocket: WebSocket) -> None:
            await websocket.accept()
            texts = websocket.iter_text()
            await anext(texts)  # "connected"
            start = json.loads(await anext(texts))["start"]
            await self._run(websocket, start)

        # No websocket pings: load.py's callers do not read (Twilio answers them; voxphone sends
        # none), and uvicorn would drop each call 40 s in when its ping went unanswered.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", ws_ping_interval=None
        )
        self._server = uvicorn.Server(config)
        self._uvicorn = uvicorn.__version__
        self.software = ""  # (said once started: what uvicorn chose)
        self._task: asyncio.Task[None] | None = None

    async def _run(self, websocket: Any, start: dict[str, Any]) -> None:
        """One call's pipeline, until the caller hangs up."""
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.runner import PipelineRunner
        from pipecat.pipeline.task import PipelineParams, PipelineTask
        from pipecat.serializers.twilio import TwilioFrameSerializer
        from pipecat.transports.websocket.fastapi import (
            FastAPIWebsocketParams,
            FastAPIWebsocketTransport,
        )

        call = PeerCall(start["callSid"])
        self.calls.append(call)

        serializer = TwilioFrameSerializer(
            start["streamSid"],
            call_sid=start["callSid"],
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        self._fed[serializer] = 2
        params = FastAPIWebsocketParams(
            audio_in_enabled=True, add_wav_header=False, serializer=serializer
        )
        transport = FastAPIWebsocketTransport(websocket, params)
        task = PipelineTask(
            Pipeline([transport.input(), _sink()(call)]),
            params=PipelineParams(audio_in_sample_rate=16000),
            enable_rtvi=False,
            enable_turn_tracking=False,
            idle_timeout_secs=None,
        )

        @transport.event_handler("on_client_disconnected")  # type: ignore[misc]
        async def hung_up(_transport: Any, _client: Any) -> None:
            call.end_reason = "disconnected"
            await task.cancel()

        await PipelineRunner(handle_sigint=False).run(task)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # (raises what stopped it)
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.05)
        import pipecat

        ws = self._server.config.ws_protocol_class
        self.software = (
            f"pipecat-ai {pipecat.__version__}, uvicorn {self._uvicorn} "
            f"({getattr(ws, '__module__', ws)})"
        )

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
