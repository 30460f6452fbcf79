"""Wiring: config → engine, event sinks, call registry, transports, HTTP; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from dataclasses import replace

import aiohttp
import structlog
from aiohttp import web
from aiortc import RTCIceServer

from voxphone import metrics
from voxphone.audio.codecs import Codec
from voxphone.call import Call, CallRegistry
from voxphone.clock import Clock, SystemClock
from voxphone.config import Config
from voxphone.engines import choose_kind
from voxphone.engines.base import Degradable, Engine
from voxphone.errors import ConfigError, cannot_listen
from voxphone.event_loop import loop_name
from voxphone.events.model import Event, EventSink, FanOut
from voxphone.events.service import Endpoint, EventService, EventSettings
from voxphone.heap import collector_off_the_clock
from voxphone.http import events as events_api
from voxphone.http import talkback
from voxphone.http import webrtc as webrtc_http
from voxphone.http.api import PROBLEMS, create_app
from voxphone.http.calls import add_routes
from voxphone.playback import BargeIn
from voxphone.transports import ws_direct
from voxphone.transports.asterisk import AudioSocketServer, chan_websocket
from voxphone.transports.mediastream import (
    STEREO_BOTH,
    TWILIO_AUTH,
    generic_stream,
    telnyx,
    twilio,
    vonage,
)
from voxphone.transports.rtp import PortPolicy, RtpServer
from voxphone.transports.webrtc import WebRtcGateway, WebRtcSettings

log = structlog.get_logger(__name__)


class EventLog:
    """Logs every event at debug level: transcripts are what callers said, so they stay out of
    INFO logs (the call's lifecycle, ``call_started``/``call_ended``, is logged at INFO)."""

    def publish(self, event: Event) -> None:
        log.debug("event", type=event.type, call_id=event.call_id, seq=event.seq, data=event.data)


def create_engine(config: Config) -> Engine:
    """The configured engine (``[engine]``, sized by ``calls.max_concurrent``), not yet
    started: each engine's own settings built from its table."""
    kind = choose_kind(config.engine.kind)
    e = config.engine
    if kind == "sphinx":
        from voxphone.engines.sphinx import SphinxEngine, SphinxSettings

        s = e.sphinx
        return SphinxEngine(
            s.workers,
            SphinxSettings(
                pause_s=s.pause_s, noise_floor=s.noise_floor, max_segment_s=s.max_segment_s
            ),
        )
    from voxphone.engines.voxtral import VoxtralSettings

    v = e.voxtral
    voxtral = VoxtralSettings(
        pause_s=v.pause_s, max_session_s=v.max_session_s, watchdog_s=v.watchdog_s,
        max_segment_s=v.max_segment_s,
    )  # fmt: skip
    if kind == "vllm-remote":
        from voxphone.engines.vllm_remote import VllmRemoteEngine

        r = e.vllm_remote
        remote = replace(voxtral, max_model_len=131_072, delay_ms=v.transcription_delay_ms)
        return VllmRemoteEngine(r.urls, r.model, remote, r.connect_timeout_s)
    from voxphone.engines.vllm_pool import VllmEngine

    c = e.vllm
    share = -(-config.calls.max_concurrent // c.engines)  # each engine's share of the calls
    seqs = c.max_num_seqs or share + max(2, share // 10)
    args = {
        "model": c.model,
        "tokenizer_mode": "mistral",
        "config_format": "mistral",
        "load_format": c.load_format,
        "max_model_len": c.max_model_len,
        "max_num_seqs": seqs,
        "dtype": c.dtype,
        "enforce_eager": c.enforce_eager,
        "limit_mm_per_prompt": {"audio": 1},
        "async_scheduling": c.async_scheduling,
    }
    if c.device == "cuda":
        args["gpu_memory_utilization"] = c.gpu_memory_utilization
        args["compilation_config"] = {"cudagraph_mode": c.cudagraph_mode}
        if c.kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = c.kv_cache_memory_bytes
    if c.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = c.max_num_batched_tokens
    local = replace(voxtral, max_model_len=c.max_model_len)
    return VllmEngine(args, local, c.device, engines=c.engines)


def event_settings(config: Config) -> EventSettings:
    """The event pipeline's settings from ``[outbox]``, ``[webhook]``, ``[[webhooks]]`` and
    ``[nats]``. Resolves the outbox's default path (``$XDG_DATA_HOME``) now."""
    out, hook, nats = config.outbox, config.webhook, config.nats
    nats_settings = None
    if nats.url:
        from voxphone.events.nats import NatsSettings  # nats-py is optional: only when used

        nats_settings = NatsSettings(
            url=nats.url, stream=nats.stream, subject_prefix=nats.subject_prefix,
            create_stream=nats.create_stream, ack_timeout_s=nats.ack_timeout_s,
        )  # fmt: skip
    return EventSettings(
        outbox_path=out.resolved_path(),
        outbox_synchronous=out.synchronous,
        outbox_busy_timeout_ms=out.busy_timeout_ms,
        outbox_max_backlog=out.max_backlog,
        outbox_retention_h=out.retention_h,
        webhook_url=hook.url,
        webhook_secrets=(hook.secret,) if hook.secret else (),
        webhook_timeout_s=hook.timeout_s,
        allowed_hosts=tuple(hook.allowed_hosts),
        endpoints=tuple(
            Endpoint(ep.name, ep.url, tuple(ep.secrets), ep.timeout_s, policy=ep)
            for ep in config.webhooks
        ),
        nats=nats_settings,
        nats_policy=nats,
    )


def webrtc_settings(config: Config) -> WebRtcSettings:
    """The WebRTC transport's settings from ``[webrtc]``."""
    w = config.webrtc
    return WebRtcSettings(
        ice_servers=tuple(
            RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in w.ice_servers
        ),
        interfaces=tuple(w.interfaces),
        public_ip=w.public_ip,
        ports=w.ports,
        disconnect_timeout_s=w.disconnect_timeout_s,
        media_timeout_s=w.media_timeout_s,
        cors_origins=tuple(w.cors_origins),
    )


def _barge_in(config: Config) -> BargeIn | None:
    play = config.playback
    return BargeIn(play.barge_in_vad_mode, play.barge_in_onset_ms) if play.barge_in else None


class App:
    """The running service. ``start`` brings everything up in dependency order, ``stop`` drains."""

    def __init__(self, config: Config, clock: Clock | None = None, engine: Engine | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        self.engine = engine or create_engine(config)
        self.events = EventService(event_settings(config), self.clock)
        self.metrics = metrics.Metrics()
        sinks: list[EventSink] = [EventLog(), self.metrics.calls, self.events]
        self.sinks = FanOut(sinks)
        self.registry = CallRegistry(
            self.engine,
            self.sinks,
            self.clock,
            config.calls.max_concurrent,
            config.rtp.max_gap_s,
            config.calls.max_duration_s,
            _barge_in(config),
        )
        self.webrtc = (
            WebRtcGateway(self.registry, webrtc_settings(config), self.clock)
            if config.webrtc.enabled
            else None
        )
        if self.webrtc is not None:
            sinks.append(self.webrtc)  # events back to the browser on its data channel
        rtp = config.rtp
        policy = PortPolicy(
            payload_types=rtp.codec_map(),
            telephone_events=frozenset(rtp.telephone_event_payload_types),
            jitter_ms=rtp.jitter_ms,
            relatch_after_s=rtp.relatch_after_s,
            ended_grace_s=rtp.ended_grace_s,
            learning_s=rtp.learning_s,
        )
        self.rtp = RtpServer(
            rtp.host, rtp.ports, self._new_rtp_call, self.clock, rtp.inactivity_timeout_s,
            rtp.no_media_timeout_s, policy, rtp.receive_buffer_bytes,
        )  # fmt: skip
        self._runner: web.AppRunner | None = None
        ast = config.asterisk
        self.audiosocket = (
            AudioSocketServer(ast.audiosocket_host, ast.audiosocket_port, self.registry)
            if ast.audiosocket_port
            else None
        )

    def _new_rtp_call(self, codec: Codec, metadata: dict[str, object]) -> Call | None:
        return self.registry.open(codec, transport="rtp", metadata=dict(metadata))

    async def start(self) -> None:
        if self.webrtc is not None:
            await self.webrtc.start()  # before anything: it only checks the WebRTC stack
        await self.events.start()  # it refuses to start on an outbox already in use
        await self.engine.start()
        await self.rtp.start()
        if self.audiosocket is not None:
            await self.audiosocket.start()
        app = create_app(self.registry, self.config.http.token)
        app[TWILIO_AUTH] = (self.config.twilio.auth_token or "", self.config.http.public_url or "")
        app[STEREO_BOTH] = self.config.media_streams.stereo == "both"
        add_routes(app, self.rtp, self._advertise_host(), self.events)
        events_api.add_routes(app, self.events)
        play = self.config.playback
        talkback.add_routes(
            app, talkback.TalkbackLimits(play.max_clip_bytes, play.max_clip_s, play.fetch_timeout_s)
        )
        self.metrics.start(app, self.events, self.registry, self.rtp.totals)
        app[PROBLEMS].append(lambda: self.events.problem)
        if isinstance(engine := self.engine, Degradable):
            app[PROBLEMS].append(lambda: engine.problem)
        if not ws_direct.DIRECT_READING:
            log.info(
                "websocket_media_through_receive",
                aiohttp=aiohttp.__version__,
                followed=[".".join(map(str, r)) for r in ws_direct.SUPPORTED],
                detail="media-stream messages take a task wake-up each (ws_direct)",
            )
        app.router.add_get("/v1/media/asterisk", chan_websocket)
        app.router.add_get("/v1/media/twilio", twilio)
        app.router.add_get("/v1/media/telnyx", telnyx)
        app.router.add_get("/v1/media/vonage", vonage)
        app.router.add_get("/v1/media/stream", generic_stream)
        if self.webrtc is not None:
            webrtc_http.add_routes(app, self.webrtc)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http.host, self.config.http.port)
        try:
            await site.start()
        except OSError as exc:
            where = f"{self.config.http.host}:{self.config.http.port}"
            fix = "choose another port (--http-port, http.port) or stop what holds it"
            raise cannot_listen("HTTP", where, exc, fix) from exc
        log.info(
            "voxphone_ready",
            http=f"http://{self.config.http.host}:{self.config.http.port}",
            rtp=f"{self.config.rtp.host}:{self.config.rtp.ports[0]}-{self.config.rtp.ports[1]}",
            engine=self.engine.name,
            webhook=self.config.webhook.url,
            demo=f"http://localhost:{self.config.http.port}/" if self.webrtc else None,
            outbox=str(self.events.outbox.path),
            endpoints=sorted(self.events.deliverers),
            event_loop=loop_name(asyncio.get_running_loop()),
        )

    def _advertise_host(self) -> str:
        rtp = self.config.rtp
        if rtp.advertise_host:
            return rtp.advertise_host
        if rtp.host in ("0.0.0.0", "::"):
            log.warning("rtp_advertise_host_guessed", hint="set rtp.advertise_host")
            return socket.gethostbyname(socket.gethostname())
        return rtp.host

    async def drain(self, drain_s: float, urgent: asyncio.Event | None = None) -> None:
        """Stop taking calls (``/ready`` answers 503 from here on; every ingress refuses) and
        let live calls go on until they end by themselves, ``drain_s`` passes or ``urgent``
        is set (a second signal)."""
        self.registry.accepting = False
        live = len(self.registry.calls)
        log.info("voxphone_draining", active_calls=live, drain_s=drain_s)
        if live and not await self.registry.wait_idle(drain_s, urgent):
            log.info("drain_deadline", active_calls=len(self.registry.calls))

    async def stop(self, flush_s: float = 10.0, urgent: asyncio.Event | None = None) -> None:
        """End the calls still live with ``shutdown`` (the engine gets ``flush_s`` for their
        last words), deliver what the outbox holds (5 s), shut down. Once ``urgent`` is set,
        nothing is waited for: calls are cut off and undelivered events stay in the outbox
        for the next start."""
        self.registry.accepting = False
        await self.registry.drain(flush_s, urgent)
        await self.rtp.stop()
        if self.webrtc is not None:
            await self.webrtc.close_all()
        if self.audiosocket is not None:
            await self.audiosocket.stop()
        await self.events.stop(0.0 if urgent is not None and urgent.is_set() else 5.0)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.engine.stop()
        await self.metrics.stop()
        log.info("voxphone_stopped")


class Signals:
    """SIGINT/SIGTERM: the first sets ``stop`` (drain), the second ``urgent`` (end now)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.urgent = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("voxphone_stopping_now", signal=sig.name)
            self.urgent.set()
        self.stop.set()


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, drain for ``calls.drain_s``, then stop (a second signal
    cuts both short). ``ConfigError`` before anything starts when the HTTP port would be
    open to anyone (``HttpConfig.exposure_error``)."""
    if (why := config.http.exposure_error()) is not None:
        raise ConfigError(why)
    app = App(config)
    signals = Signals()
    signals.install(asyncio.get_running_loop())
    try:
        await app.start()
        async with collector_off_the_clock():
            await signals.stop.wait()
            await app.drain(config.calls.drain_s, signals.urgent)
    finally:
        await app.stop(urgent=signals.urgent)
