"""Configuration: one TOML file, ``VOXPHONE_*`` environment overrides, then command-line flags.

Every default lives here. Validation happens once, at startup, and a bad value is reported with
its source and dotted key (``voxphone.toml: rtp.ports: ...``) instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from voxphone.audio.codecs import (
    DEFAULT_DYNAMIC_PAYLOAD_TYPES,
    STATIC_PAYLOAD_TYPES,
    Codec,
    codec_by_name,
)
from voxphone.errors import ConfigError, DecodeError
from voxphone.event_loop import EventLoop
from voxphone.events.delivery import EVENT_HORIZONS, DeliveryPolicy
from voxphone.events.webhook import decode_secret
from voxphone.transports.rtp import MAX_RECEIVE_BUFFER_BYTES, RECEIVE_BUFFER_BYTES
from voxphone.validation import error_message

ENV_PREFIX = "VOXPHONE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpConfig(_Section):
    """The HTTP server: health, readiness and the calls API."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: When set, every /v1/ request needs it: ``?token=…`` (what CPaaS stream URLs can carry)
    #: or ``Authorization: Bearer …``. Health and readiness stay open.
    token: str | None = None
    #: This server's address as callers see it (``https://voxphone.example.com``), for
    #: checking Twilio's request signatures behind proxies.
    public_url: str | None = None
    #: Listen beyond loopback without a token (only behind something that authenticates).
    allow_unauthenticated: bool = False

    def exposure_error(self) -> str | None:
        """Why serving this way is refused: a non-loopback ``host`` with no ``token`` gives
        anyone who reaches the port the calls API, every live transcript, replays and per-call
        webhooks. None when loopback, with a token, or explicitly allowed."""
        if self.token or self.allow_unauthenticated or _is_loopback(self.host):
            return None
        return (
            f"http.host {self.host} listens beyond loopback with no http.token: anyone who "
            "reaches it gets the calls API and every transcript; set http.token "
            "(VOXPHONE_HTTP__TOKEN), or http.allow_unauthenticated = true behind a proxy "
            "that authenticates"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TwilioConfig(_Section):
    """Twilio Media Streams: with the account's auth token set, unsigned streams are refused."""

    auth_token: str | None = None


class RtpConfig(_Section):
    """Plain RTP ingress. A call starts with the first valid packets from a new source."""

    host: str = "127.0.0.1"
    #: Inclusive UDP port range, ``"40000-40100"``; every port in it accepts calls.
    ports: tuple[int, int] = (40000, 40100)
    #: A first-packet call (no signalling) ends after this many seconds without a packet.
    inactivity_timeout_s: float = Field(5.0, gt=0)
    #: Largest gap in a call's media timestamps filled with silence; a bigger jump re-anchors.
    max_gap_s: float = Field(5.0, gt=0)
    #: Dynamic payload types (96-127) to codec names, for senders that don't signal them.
    #: PCMU (0), PCMA (8) and G722 (9) are static and always known.
    payload_types: dict[int, str] = Field(
        default_factory=lambda: dict(DEFAULT_DYNAMIC_PAYLOAD_TYPES)
    )

    @field_validator("payload_types")
    @classmethod
    def _check_payload_types(cls, value: dict[int, str]) -> dict[int, str]:
        for pt, name in value.items():
            if not 96 <= pt <= 127:
                raise ValueError(f"payload type {pt} is not dynamic (96-127)")
            try:
                codec_by_name(name)
            except DecodeError as exc:
                raise ValueError(f"payload type {pt}: {exc}") from None
        return value

    #: A call created by the API ends after this many seconds without a packet, from the start
    #: or since the last one: its pauses (silence suppression, DTX) are not a hang-up.
    no_media_timeout_s: float = Field(30.0, gt=0)
    #: An ended call's media is ignored (counted ``after_end``) until it has stopped for this
    #: many seconds; then its port returns to the pool.
    ended_grace_s: float = Field(3.0, ge=0)
    #: After an API call latched onto a source that is not the SDP's address (NAT), media from
    #: the SDP's address may still take over for this many seconds (Asterisk strictrtp learning).
    learning_s: float = Field(5.0, ge=0)
    #: The address put in SDP answers and API replies (default: ``host``, unless 0.0.0.0).
    advertise_host: str | None = None
    #: NAT rebinding: on an API-allocated port, a new source may take over the call once the
    #: latched one has been silent this long (seconds); unset = never (strict latching).
    relatch_after_s: float | None = Field(None, gt=0)
    #: Jitter buffer depth: how long a missing packet is waited for before it becomes silence.
    jitter_ms: int = Field(60, ge=0, le=1000)
    #: Payload types carrying RFC 4733 telephone-events (DTMF).
    telephone_event_payload_types: list[int] = [101]
    #: Each port's socket receive buffer (``SO_RCVBUF``), which holds packets while the event
    #: loop is busy; what the kernel drops from a full one is counted (``receive_buffer_full``).
    #: Linux grants at most the sysctl ``net.core.rmem_max`` (the start-up log says when).
    receive_buffer_bytes: int = Field(RECEIVE_BUFFER_BYTES, ge=4096, le=MAX_RECEIVE_BUFFER_BYTES)

    def codec_map(self) -> dict[int, Codec]:
        """Every payload type this endpoint decodes."""
        return {
            **STATIC_PAYLOAD_TYPES,
            **{pt: codec_by_name(n) for pt, n in self.payload_types.items()},
        }

    _ports = field_validator("ports", mode="before")(lambda value: _port_range(value))
    _check_ports = field_validator("ports")(lambda value: _check_port_range(value))


def _port_range(value: Any) -> Any:
    """``"40000-40100"`` → ``(40000, 40100)``; other shapes are left to pydantic."""
    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        if not sep or not lo.strip().isdecimal() or not hi.strip().isdecimal():
            raise ValueError(f"expected a port range like '40000-40100', got {value!r}")
        return (int(lo), int(hi))
    return value


def _check_port_range(value: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is not None and not 1 <= value[0] <= value[1] <= 65535:
        lo, hi = value
        raise ValueError(f"port range {lo}-{hi} must satisfy 1 <= low <= high <= 65535")
    return value


class AsteriskConfig(_Section):
    """Asterisk's stream media paths. chan_websocket is always at ``/v1/media/asterisk`` on the
    HTTP port; AudioSocket has its own TCP port, off (0) unless configured: its customary 9092
    is Kafka's too, and a second instance on one host would fail to start."""

    audiosocket_host: str = "127.0.0.1"
    audiosocket_port: int = Field(0, ge=0, le=65535)


class MediaStreamsConfig(_Section):
    """The L16 media-stream websockets (FreeSWITCH, jambonz)."""

    #: Stereo streams carry caller and callee: transcribe the ``caller`` only, or ``both`` as
    #: two calls (``<id>`` and ``<id>:callee``) whose events carry ``channel`` 0 or 1.
    stereo: Literal["caller", "both"] = "caller"


class IceServer(_Section):
    """A STUN or TURN server, as in the browser's ``RTCIceServer``."""

    urls: list[str] = Field(min_length=1)
    username: str | None = None
    credential: str | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _check_scheme(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"{url!r} is not a stun:, turn: or turns: URL")
        return value


class WebRtcConfig(_Section):
    """Browser calls over WebRTC (WHIP at ``/v1/whip``, the demo page at ``/``).

    A server behind NAT or in a container needs the last three: the address browsers can reach,
    the UDP ports that are forwarded to it, or a TURN server.
    """

    enabled: bool = True
    #: STUN/TURN servers for the server's own candidates; none by default (no traffic leaves).
    ice_servers: list[IceServer] = []
    #: Local addresses to gather host candidates on (default: every interface but loopback).
    interfaces: list[str] = []
    #: The public address of a 1:1 NAT (cloud VM, container with published ports): announced as
    #: an extra host candidate on the same ports.
    public_ip: str | None = None
    #: UDP ports for host candidates, ``"50000-50100"``; unset = any ephemeral port.
    ports: tuple[int, int] | None = None
    #: A call whose ICE stays ``disconnected`` this long ends (``reason: ice_disconnected``).
    disconnect_timeout_s: float = Field(5.0, gt=0)
    #: A call with no audio frame for this long ends (``reason: no_media``): a closed tab.
    media_timeout_s: float = Field(10.0, gt=0)
    #: Web origins whose pages may call the WHIP endpoint (CORS), e.g. ``"https://app.example.com"``
    #: or ``"*"``; the demo page at ``/`` is same-origin and needs none.
    cors_origins: list[str] = []

    _ports = field_validator("ports", mode="before")(lambda value: _port_range(value))
    _check_ports = field_validator("ports")(lambda value: _check_port_range(value))


class CallsConfig(_Section):
    """Admission: how many calls one process takes at once."""

    max_concurrent: int = Field(50, ge=1)
    #: A call is hung up (``call.ended{reason: max_duration}``) after this long.
    max_duration_s: float = Field(4 * 3600, gt=0)
    #: On SIGTERM, live calls go on until they end or this many seconds pass; then the rest
    #: end with ``shutdown``. A rolling deploy sets its grace period above it.
    drain_s: float = Field(30.0, ge=0)


class PlaybackConfig(_Section):
    """Talk back: bot audio played into calls (``POST /v1/calls/{id}/play``, the audio socket)."""

    #: Clear the bot's audio when the caller starts speaking over it
    #: (``playback.cleared{reason: "barge_in"}``).
    barge_in: bool = False
    #: Speech onset for barge-in: WebRTC VAD aggressiveness (0-3; 3 rejects the most noise)
    #: and how long speech must last (ms, in 20 ms steps) before the bot is cleared.
    barge_in_vad_mode: int = Field(3, ge=0, le=3)
    barge_in_onset_ms: int = Field(60, ge=20, le=160, multiple_of=20)
    #: The largest clip ``play`` accepts, as uploaded or fetched (bytes), and decoded (s).
    max_clip_bytes: int = Field(20_000_000, ge=1024)
    max_clip_s: float = Field(600.0, gt=0)
    #: Fetching ``{"url": ...}`` gives up after this long.
    fetch_timeout_s: float = Field(10.0, gt=0)


class SphinxConfig(_Section):
    """The embedded pocketsphinx engine."""

    #: Worker processes (pocketsphinx holds the GIL, so parallelism needs processes).
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    #: Seconds of non-speech that close a ``transcript.final`` segment.
    pause_s: float = Field(0.5, gt=0.05, le=5)
    #: Faint white noise (int16 standard deviation) that makes 8 kHz audio usable by the model.
    noise_floor: float = Field(30.0, ge=0)
    #: Speech without a pause closes a segment at the first word boundary past this many seconds.
    max_segment_s: float = Field(30.0, ge=1)


VOXTRAL = "mistralai/Voxtral-Mini-4B-Realtime-2602"


class VoxtralConfig(_Section):
    """Behaviour shared by both vLLM engines (segments, rollover, watchdog)."""

    #: Seconds without new text, after some text, that close a ``transcript.final``.
    pause_s: float = Field(0.8, ge=0.16, le=10)
    #: Speech without a pause closes a segment at the first word boundary past this many seconds.
    max_segment_s: float = Field(30.0, ge=1)
    #: A session is rolled over (at a pause) before this many seconds, and before max_model_len.
    max_session_s: float = Field(600.0, ge=10)
    #: Restart a session that has heard this many seconds of speech without writing anything.
    watchdog_s: float = Field(10.0, ge=1)
    #: The served model's tekken.json ``transcription_delay_ms`` (for ``vllm-remote``; the
    #: in-process engine reads it from the model directory).
    transcription_delay_ms: int = 480

    @field_validator("transcription_delay_ms")
    @classmethod
    def _check_delay(cls, value: int) -> int:
        if value % 80 or not (80 <= value <= 1200 or value == 2400):
            raise ValueError(f"{value} is not a multiple of 80 ms from 80 to 1200, or 2400")
        return value


class VllmConfig(_Section):
    """The ``vllm`` engine: worker processes voxphone starts, each an ``AsyncLLM`` (see vLLM's
    engine args; each worker gets these)."""

    #: A local directory in Mistral format (params.json, tekken.json, weights) or a hub id.
    model: str = VOXTRAL
    #: Tokens per session (80 ms each): 45000 = 1 hour. Sizes vLLM's encoder cache too.
    max_model_len: int = Field(45_000, ge=256)
    #: Concurrent sessions; default: calls.max_concurrent plus rollover headroom.
    max_num_seqs: int | None = Field(None, ge=1)
    #: Engine processes sharing the GPU; calls go to the least loaded. One engine's Python
    #: work per 80 ms frame saturates two cores long before the GPU is busy, so several carry
    #: more calls (run CUDA MPS so their kernels overlap). See the README's capacity table.
    engines: int = Field(1, ge=1, le=64)
    #: Fraction of GPU memory for all engines together (each gets its share).
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    #: KV cache bytes per engine (vLLM's ``kv_cache_memory_bytes``): sizes the cache without
    #: vLLM's memory profiling, so several engines can start at once instead of in turn.
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    #: vLLM's ``max_num_batched_tokens`` (tokens per engine step); default: vLLM's.
    max_num_batched_tokens: int | None = Field(None, ge=64)
    #: vLLM's ``async_scheduling`` (schedule step n+1 while step n runs). Off: with streaming
    #: sessions it multiplied lag ~9× at 256 calls on an H200 (p99 1114 vs 121 ms, README).
    async_scheduling: bool = False
    #: PIECEWISE (the model card's choice); FULL_AND_PIECEWISE or FULL_DECODE_ONLY need vLLM
    #: 0.32 or later (0.26 refuses them at start: "Please use PIECEWISE"); never FULL.
    cudagraph_mode: Literal["PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "NONE"] = (
        "PIECEWISE"
    )
    enforce_eager: bool = False
    dtype: str = "auto"
    #: ``dummy`` = random weights (tests, capacity runs without the real weights).
    load_format: Literal["mistral", "dummy"] = "mistral"
    #: ``cpu`` runs vLLM's CPU build (tests); production is ``cuda``.
    device: Literal["cuda", "cpu"] = "cuda"


class VllmRemoteConfig(_Section):
    """The remote engine: ``vllm serve`` instances speaking ``/v1/realtime``."""

    urls: list[str] = ["ws://127.0.0.1:8000/v1/realtime"]
    #: The served model name (``vllm serve --served-model-name``, default the model path).
    model: str = VOXTRAL
    connect_timeout_s: float = Field(5.0, gt=0)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"expected ws:// or wss:// URLs, got {url!r}")
        if not value:
            raise ValueError("at least one server URL is needed")
        return value


EngineKind = Literal["auto", "sphinx", "vllm", "vllm-remote"]


class EngineConfig(_Section):
    """Which speech engine transcribes calls."""

    kind: EngineKind = "auto"
    sphinx: SphinxConfig = SphinxConfig()
    voxtral: VoxtralConfig = VoxtralConfig()
    vllm: VllmConfig = VllmConfig()
    vllm_remote: VllmRemoteConfig = VllmRemoteConfig()


class WebhookConfig(_Section):
    """Where events are POSTed (Standard Webhooks signing when a secret is set)."""

    url: str | None = None
    secret: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    #: Per-call ``webhook_url``s (given through the API) may not reach loopback, link-local,
    #: private or other non-public addresses, except these host names, addresses or networks
    #: (``["hooks.internal", "10.0.0.0/8"]``). The configured ``url`` and ``[[webhooks]]``
    #: are trusted and not limited.
    allowed_hosts: list[str] = []

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {value!r}")
        return value or None

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        return check_secret(value) if value else None


#: How to make a webhook secret, for messages about a bad one.
MAKE_SECRET = (
    """python3 -c "import secrets,base64;"""
    """print('whsec_'+base64.b64encode(secrets.token_bytes(24)).decode())\""""
)
MIN_SECRET_BYTES = 24  # Standard Webhooks: 24 to 64 random bytes


def check_secret(value: str) -> str:
    """A ``whsec_<base64>`` key of at least 24 bytes; the error says how to make one."""
    try:
        key = decode_secret(value)
    except ConfigError as exc:
        raise ValueError(f"{exc}; {_SECRET_HELP}") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret is {len(key)} bytes, too short; {_SECRET_HELP}")
    return value


_SECRET_HELP = (
    f"a secret is 'whsec_' + base64 of {MIN_SECRET_BYTES} to 64 random bytes; "
    f"make one with: {MAKE_SECRET}"
)


class EndpointConfig(DeliveryPolicy):
    """One webhook endpoint (a ``[[webhooks]]`` entry)."""

    #: Stable name: the outbox keeps delivery state under it and the API addresses it by it.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://")
    #: ``whsec_…`` keys; during a rotation list new and old: every request carries one
    #: ``v1,`` signature per key. Empty = unsigned.
    secrets: list[str] = []
    timeout_s: float = Field(15.0, gt=0)

    @field_validator("secrets")
    @classmethod
    def _check_secrets(cls, value: list[str]) -> list[str]:
        return [check_secret(s) for s in value]


class OutboxConfig(_Section):
    """The durable event outbox (SQLite, WAL): every event is committed before delivery."""

    #: Database file; default ``$XDG_DATA_HOME/voxphone/events.db`` (~/.local/share/…).
    path: Path | None = None
    #: ``FULL``: each commit is fsynced (survives power loss); ``NORMAL``: survives a crash of
    #: the process but a power cut may lose the last commits.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: How long a write waits for a lock held by someone else before counting as failed.
    busy_timeout_ms: int = Field(2000, ge=0)
    #: Delivered events older than this are deleted (compaction runs hourly).
    retention_h: float = Field(72.0, gt=0)
    #: Events held in memory while the database can't be written; past it, new events are
    #: dropped (counted and logged as errors).
    max_backlog: int = Field(1_000_000, ge=1)

    def resolved_path(self, environ: Mapping[str, str] | None = None) -> Path:
        if self.path is not None:
            return self.path
        env = os.environ if environ is None else environ
        base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "voxphone" / "events.db"


class NatsConfig(DeliveryPolicy):
    """NATS JetStream: one shared, durable stream for a fleet of voxphone processes."""

    #: ``nats://host:4222`` (several comma-separated); unset = no NATS sink.
    url: str | None = None
    stream: str = Field("VOXPHONE", pattern=r"^[A-Za-z0-9_-]+$")
    #: Events go to ``<subject_prefix>.<type>`` (``voxphone.events.transcript.final``).
    subject_prefix: str = Field("voxphone.events", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    #: Create the stream (file storage, the prefix's subjects) when it does not exist.
    create_stream: bool = True
    #: Seconds to wait for JetStream's publish acknowledgement, and for the connection to be
    #: made (a server that is down at start is retried with the delivery backoff).
    ack_timeout_s: float = Field(5.0, gt=0)
    #: A stream is the record: deltas are kept longer than for webhooks, and not coalesced.
    horizons_s: dict[str, float] = Field(
        default_factory=lambda: {**EVENT_HORIZONS, "transcript.delta": 3600.0}
    )
    coalesce_deltas: bool = False

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value and not all(u.strip().startswith(("nats://", "tls://")) for u in value.split(",")):
            raise ValueError(f"expected nats:// or tls:// URLs, got {value!r}")
        return value or None


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``auto`` = coloured console lines on a terminal, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class ProcessConfig(_Section):
    """The ``voxphone serve`` process itself."""

    #: ``auto``: uvloop's loop where uvloop is installed (a dependency on CPython outside
    #: Windows), else asyncio's, with a warning. uvloop spends less per wake-up, which is what
    #: many independent RTP callers cost most; ``asyncio`` or ``uvloop`` insist on one
    #: (``voxphone.event_loop``).
    event_loop: EventLoop = "auto"


class Config(_Section):
    """The whole configuration; each section maps to a ``[table]`` of the TOML file."""

    http: HttpConfig = HttpConfig()
    rtp: RtpConfig = RtpConfig()
    calls: CallsConfig = CallsConfig()
    playback: PlaybackConfig = PlaybackConfig()
    asterisk: AsteriskConfig = AsteriskConfig()
    twilio: TwilioConfig = TwilioConfig()
    media_streams: MediaStreamsConfig = MediaStreamsConfig()
    webrtc: WebRtcConfig = WebRtcConfig()
    engine: EngineConfig = EngineConfig()
    webhook: WebhookConfig = WebhookConfig()
    webhooks: list[EndpointConfig] = []
    outbox: OutboxConfig = OutboxConfig()
    nats: NatsConfig = NatsConfig()
    log: LogConfig = LogConfig()
    process: ProcessConfig = ProcessConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        port = self.asterisk.audiosocket_port
        hosts = {self.asterisk.audiosocket_host, self.http.host}
        if port and port == self.http.port and (len(hosts) == 1 or hosts & {"0.0.0.0", "::", ""}):
            raise ValueError(
                f"asterisk.audiosocket_port and http.port are both {port}: AudioSocket and HTTP "
                "each need a TCP port of their own; choose another for one of them"
            )
        seqs = self.engine.vllm.max_num_seqs
        if seqs is not None and seqs < self.calls.max_concurrent:
            raise ValueError(
                f"engine.vllm.max_num_seqs ({seqs}) is below calls.max_concurrent "
                f"({self.calls.max_concurrent}): each call holds one vLLM slot"
            )
        names = [w.name for w in self.webhooks]
        for reserved in ("default", "call", "nats"):
            if reserved in names:
                raise ValueError(f"webhooks: the name {reserved!r} is reserved")
        if len(set(names)) != len(names):
            raise ValueError(f"webhooks: names must be unique, got {names}")
        return self


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Build the config: file, then ``VOXPHONE_SECTION__KEY`` variables, then ``overrides``.

    ``overrides`` maps dotted keys (``"rtp.ports"``) to values, as the CLI flags produce them;
    ``flags`` names the flag behind each (``"--rtp-ports"``). A bad value is blamed on its real
    source: the variable, the flag, or else the file.
    """
    data: dict[str, Any] = _read_toml(path) if path else {}
    origins: dict[str, str] = {}  # dotted key → the variable or flag that set it
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and "__" not in name and (meant := _misspelt(name)):
            raise ConfigError(
                f"{name}: not read: a key inside a section takes a double underscore, {meant}"
            )
        if name.startswith(ENV_PREFIX) and "__" in name:
            key = name.removeprefix(ENV_PREFIX).lower().replace("__", ".")
            _set_dotted(data, key, _env_value(name, value), name)
            origins[key] = name
    for key, value in (overrides or {}).items():
        if value is not None:
            origin = (flags or {}).get(key, "override")
            _set_dotted(data, key, value, origin)
            origins[key] = origin
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path) if path else "config", origins)) from None


def _misspelt(name: str) -> str | None:
    """The variable ``name`` was meant to be, when it is a config key written with single
    underscores (``VOXPHONE_HTTP_PORT`` for ``VOXPHONE_HTTP__PORT``): silently ignoring it would
    leave the default in force. Other ``VOXPHONE_*`` names (not config keys) are left alone."""
    for key in _dotted_keys(Config):
        if name == ENV_PREFIX + key.upper().replace(".", "_"):
            return ENV_PREFIX + key.upper().replace(".", "__")
    return None


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable key below the top level: ``http.port``, ``engine.vllm.engines``…"""
    keys = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += _dotted_keys(kind, f"{prefix}{name}.")
        elif prefix:
            keys.append(prefix + name)
    return keys


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _env_value(name: str, value: str) -> Any:
    """Tables and lists come as JSON (``VOXPHONE_RTP__PAYLOAD_TYPES='{"119": "L16/8000"}'``)."""
    if not value.lstrip().startswith(("{", "[")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: invalid JSON: {exc}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {key}: {part!r} is a value, not a table")
        node = child
    node[leaf] = value


def _describe(exc: ValidationError, default: str, origins: Mapping[str, str]) -> str:
    """One ``source: dotted.key: message`` line per error."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else error_message(err)
        origin = _origin(key, origins, default)
        if origin.startswith(ENV_PREFIX) and (example := _JSON_EXAMPLES.get(err["type"])):
            msg += f"; a variable gives it as JSON, e.g. {origin}='{example}'"
        lines.append(f"{origin}: {key or '(top level)'}: {msg}")
    return "\n".join(lines)


#: pydantic's error types for a value that must be a list or a table, and what such a value
#: looks like in a ``VOXPHONE_*`` variable (``_env_value`` reads those as JSON).
_JSON_EXAMPLES = {
    "list_type": '["…"]',
    "tuple_type": '["…"]',
    "set_type": '["…"]',
    "dict_type": '{"…": "…"}',
    "model_type": '{"…": "…"}',
}


def _origin(key: str, origins: Mapping[str, str], default: str) -> str:
    """Who set the value at ``key``: the last variable or flag that set it, a table holding it
    or a key inside it; else ``default`` (the file). A whole-config error has no one key."""
    for set_key, origin in list(origins.items())[::-1]:
        if key and (f"{key}.".startswith(f"{set_key}.") or set_key.startswith(f"{key}.")):
            return origin
    return default
