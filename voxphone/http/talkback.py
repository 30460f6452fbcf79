"""Talk back over HTTP: play audio into a live call, stop it, send DTMF, stream bot audio.

- ``POST /v1/calls/{id}/play``: an audio file as the body (any format FFmpeg decodes:
  ``audio/wav``, ``audio/mpeg``, ``audio/ogg``...) or JSON ``{"url": "https://…"}`` (fetched
  under the same server-side-request rules as ``webhook_url``: http(s) only, no private
  addresses unless ``webhook.allowed_hosts`` allows them). 202 ``{"playback_id", "duration_ms"}``;
  it plays after whatever is queued.
- ``POST /v1/calls/{id}/clear``: drop the queued audio; 200 ``{"cleared": [playback ids]}``.
- ``POST /v1/calls/{id}/dtmf``: ``{"digits": "12#", "duration_ms": 100}``; 202, sent in turn.
- ``GET /v1/calls/{id}/audio?rate=16000`` (websocket): binary frames of little-endian int16
  mono PCM at ``rate`` in, played as they arrive (streaming TTS); text ``{"type": "mark",
  "name": "x"}`` and ``{"type": "clear"}``; out, the call's events as on ``/v1/events/ws``
  (``{"cursor", "event"}``), and ``{"error": "..."}`` for a message it could not use. The
  socket closes (1000) after ``call.ended``.

Refusals: 404 no such call, 410 the call has ended, 409 it is ending or its transport cannot
talk back (or send DTMF), 400 bad JSON, fields or URLs (not http(s), an address the rules
refuse, a host that does not resolve: checked before anything is fetched), 413 too large, 415 a
body FFmpeg cannot decode, 422 a URL whose fetch failed (no connection, a timeout, an HTTP
error, a redirect the rules refuse) or whose body FFmpeg cannot decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import av
import numpy as np
from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from yarl import URL

from voxphone.audio.codecs import Pcm
from voxphone.audio.files import TooLong, decode_audio
from voxphone.call import Call
from voxphone.errors import DecodeError, PlaybackError
from voxphone.events.service import EventService
from voxphone.events.ssrf import GuardedResolver, HostPolicy, RefusedUrl
from voxphone.events.stream import Filter, follow, head
from voxphone.http.api import REGISTRY, error, invalid, refusal
from voxphone.http.calls import WEBHOOKS
from voxphone.http.events import EVENTS, STREAMS
from voxphone.playback import OutboundStream


@dataclass(frozen=True)
class TalkbackLimits:
    """What the control API accepts (the app fills it from ``[playback]``)."""

    max_clip_bytes: int = 20_000_000
    max_clip_s: float = 600.0
    fetch_timeout_s: float = 10.0


LIMITS = web.AppKey("talkback_limits", TalkbackLimits)
#: Rates the audio websocket takes (``?rate=``), Hz.
STREAM_RATES = (8000, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
#: The audio socket refuses audio while this much (s) is queued and not yet played (answered
#: and counted as ``audio_over_limit``): memory stays bounded however fast a TTS sends.
#: (``/play`` refuses a clip that would queue more than ``playback.max_clip_s``.)
MAX_AHEAD_S = 60.0
#: Marks that may wait for their audio in one call (each is kept until its frame is sent).
MAX_PENDING_MARKS = 1000
OVER_LIMIT = f"over {MAX_AHEAD_S:g} s of audio queued: frame dropped; send nearer real time"


class PlayUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Checked by ``HostPolicy.check_url`` (scheme, host, addresses): one message for all.
    url: str = Field(max_length=2048)


class SendDtmf(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digits: str = Field(max_length=64)
    duration_ms: int = Field(100, ge=40, le=5000)

    @field_validator("digits")
    @classmethod
    def _check_digits(cls, value: str) -> str:
        """The 16 DTMF keys (RFC 4733 §3.2 events 0-15), at least one."""
        if not value or value.strip("0123456789*#ABCDabcd"):
            raise ValueError(f"send keys among 0-9, *, #, A-D (at least one), got {value!r}")
        return value


def live_call(request: web.Request) -> Call:
    """The call named in the path, able to talk back; else the refusal (404/410/409)."""
    registry, call_id = request.app[REGISTRY], request.match_info["call_id"]
    call = registry.calls.get(call_id)
    if call is None:
        if call_id in registry.ended:
            raise refusal(web.HTTPGone, f"call {call_id!r} has ended")
        raise refusal(web.HTTPNotFound, f"no live call {call_id!r}: GET /v1/calls lists them")
    if call.end_reason is not None:
        raise refusal(web.HTTPConflict, f"call {call_id!r} is ending ({call.end_reason})")
    if call.playout is None:
        raise refusal(
            web.HTTPConflict,
            f"call {call_id!r} cannot talk back: its transport ({call.transport}) has no "
            "outbound audio",
        )
    return call


def _refused(call: Call, exc: PlaybackError) -> web.Response:
    """A ``PlaybackError`` raised after the checks: the call ended meanwhile (410)."""
    return error(410 if call.end_reason is not None else 409, f"call {call.call_id!r}: {exc}")


async def play(request: web.Request) -> web.Response:
    call = live_call(request)
    # Held from here: a call that ends while the clip uploads, downloads or decodes lets go of
    # its playout; the clip is then refused by ``call.play`` (410).
    playout = call.playout
    assert playout is not None
    limits = request.app[LIMITS]
    if request.content_type == "application/json":
        data, url = await _fetch(request, limits)
        what = f"url: the file at {url}"
    else:
        data = await _body(request, limits.max_clip_bytes)
        what = f"the body ({request.content_type})"
    rate = playout.rate
    try:  # in a worker thread: a small compressed file can be minutes of audio to decode
        pcm = await asyncio.to_thread(decode_audio, data, rate, limits.max_clip_s)
    except TooLong as exc:
        return error(413, f"{what}: {exc}; raise playback.max_clip_s")
    except DecodeError as exc:
        status = 422 if request.content_type == "application/json" else 415
        return error(status, f"{what} cannot be decoded: {_cause(exc)}")
    # What waits in one call is bounded by one longest clip, however often a bot retries.
    queued_s = playout.queued_s
    if queued_s + pcm.size / rate > limits.max_clip_s:
        return error(
            409,
            f"call {call.call_id!r}: {queued_s:.1f} s already queued and this clip is "
            f"{pcm.size / rate:.1f} s: at most playback.max_clip_s ({limits.max_clip_s:g} s) "
            "may wait; play it later or clear first",
        )
    try:
        playback = call.play(pcm, rate)
    except PlaybackError as exc:
        return _refused(call, exc)
    duration_ms = pcm.size * 1000 // rate
    return web.json_response({"playback_id": playback.id, "duration_ms": duration_ms}, status=202)


def _cause(exc: DecodeError) -> str:
    """FFmpeg's own words (``Invalid data found when processing input``), without its errno
    and path; else ours (``no audio stream``)."""
    cause = exc.__cause__
    if isinstance(cause, av.FFmpegError) and cause.strerror:
        return f"{cause.strerror}; send a file such as audio/wav, audio/mpeg or audio/ogg"
    return str(exc).removeprefix("the audio: ").removeprefix("the audio ")


async def _body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise refusal(web.HTTPRequestEntityTooLarge, _too_large(request.content_length, limit),
                      max_size=limit, actual_size=request.content_length)  # fmt: skip
    data = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        data += chunk
        if len(data) > limit:
            raise refusal(web.HTTPRequestEntityTooLarge, _too_large(len(data), limit),
                          max_size=limit, actual_size=len(data))  # fmt: skip
    if not data:
        raise refusal(
            web.HTTPBadRequest,
            'the body is empty: send an audio file (e.g. audio/wav) or JSON {"url": ...}',
        )
    return bytes(data)


def _too_large(size: int, limit: int) -> str:
    return f"the audio is over {limit} bytes ({size}+); raise playback.max_clip_bytes"


def _json(text: str, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(json.loads(text or "{}"))
    except json.JSONDecodeError as exc:
        raise refusal(web.HTTPBadRequest, f"body is not JSON: {exc}") from None
    except ValidationError as exc:
        raise refusal(web.HTTPBadRequest, invalid(exc)) from None


async def _fetch(request: web.Request, limits: TalkbackLimits) -> tuple[bytes, str]:
    """The clip at ``{"url"}``, guarded like ``webhook_url`` (checked now and at connect)."""
    body = _json(await request.text(), PlayUrl)
    assert isinstance(body, PlayUrl)
    policy = request.app[WEBHOOKS].url_policy
    try:
        await policy.check_url(body.url)
    except RefusedUrl as exc:
        raise refusal(web.HTTPBadRequest, f"url: {exc}") from None
    return await fetch_clip(body.url, policy, limits), body.url


#: Redirects a clip URL may take (a CDN, a presigned store), each hop checked like the URL.
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def fetch_clip(url: str, policy: HostPolicy, limits: TalkbackLimits) -> bytes:
    """GET ``url`` (already checked) for ``/play``: its body, or a refusal (413, 422).

    Redirects are followed here, not by aiohttp, so that every hop's ``Location`` gets
    ``policy.check_url``: aiohttp's connector skips the resolver for an IP-literal host, so
    ``GuardedResolver`` alone would let a public server redirect voxphone to ``127.0.0.1``.
    """
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy))
    timeout = aiohttp.ClientTimeout(total=limits.fetch_timeout_s)
    limit = limits.max_clip_bytes
    at = url
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for hop in range(MAX_REDIRECTS + 1):
                async with http.get(at, allow_redirects=False) as resp:
                    location = resp.headers.get(hdrs.LOCATION)
                    if resp.status in _REDIRECTS and location:
                        if hop == MAX_REDIRECTS:
                            raise refusal(
                                web.HTTPUnprocessableEntity,
                                f"url: {url}: more than {MAX_REDIRECTS} redirects",
                            )
                        at = await _next_hop(url, str(resp.url.join(URL(location))), policy)
                        continue
                    if resp.status != 200:
                        raise refusal(
                            web.HTTPUnprocessableEntity,
                            f"url: {at} answered {resp.status} {resp.reason}",
                        )
                    data = bytearray()
                    async for chunk in resp.content.iter_chunked(65536):
                        data += chunk
                        if len(data) > limit:
                            raise refusal(
                                web.HTTPRequestEntityTooLarge,
                                f"url: {_too_large(len(data), limit)}",
                            )
                    return bytes(data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise refusal(web.HTTPUnprocessableEntity, f"url: cannot fetch {at}: {why}") from None
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


async def _next_hop(url: str, location: str, policy: HostPolicy) -> str:
    """A redirect's target once the policy allows it; else a 422 naming both."""
    try:
        await policy.check_url(location)
    except RefusedUrl as exc:
        raise refusal(
            web.HTTPUnprocessableEntity, f"url: {url} redirects to {location}: {exc}"
        ) from None
    return location


async def clear(request: web.Request) -> web.Response:
    call = live_call(request)
    try:
        cleared = call.clear("api")
    except PlaybackError as exc:
        return _refused(call, exc)
    return web.json_response({"cleared": cleared})


async def dtmf(request: web.Request) -> web.Response:
    call = live_call(request)
    body = _json(await request.text(), SendDtmf)
    assert isinstance(body, SendDtmf)
    try:
        call.start_dtmf(body.digits, body.duration_ms)
    except PlaybackError as exc:
        return _refused(call, exc)
    return web.json_response({"digits": body.digits.upper()}, status=202)


async def audio_socket(request: web.Request) -> web.StreamResponse:
    """The per-call bot-audio websocket (see the module docstring)."""
    rate_text = request.query.get("rate", "16000")
    if not rate_text.isdecimal() or int(rate_text) not in STREAM_RATES:
        rates = ", ".join(map(str, STREAM_RATES))
        return error(400, f"rate: expected one of {rates} (Hz), got {rate_text!r}")
    call = live_call(request)
    try:
        stream = call.open_audio_stream(int(rate_text))
    except PlaybackError as exc:
        return _refused(call, exc)
    playout = call.playout  # (the call lets go of it when it ends, while this reads on)
    assert playout is not None
    svc = request.app[EVENTS]
    after = await head(svc.outbox)
    ws = web.WebSocketResponse(heartbeat=15)
    await ws.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    request.app[STREAMS].add(task)
    events = asyncio.create_task(_events_out(ws, svc, after, call.call_id))
    odd = b""  # a sample split across two frames
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                data = odd + msg.data
                cut = len(data) - len(data) % 2
                odd = data[cut:]
                pcm: Pcm = np.frombuffer(data[:cut], "<i2").astype(np.int16)
                if playout.queued_s > MAX_AHEAD_S:
                    call.count_dropped("audio_over_limit")
                    await ws.send_json({"error": OVER_LIMIT})
                elif not _use(functools.partial(stream.write, pcm)):
                    break
            elif msg.type == aiohttp.WSMsgType.TEXT and not await _control(
                ws, call, stream, msg.data
            ):
                break
    finally:
        request.app[STREAMS].discard(task)
        stream.close()  # what was sent still plays out
        events.cancel()
    return ws


def _use(action: Callable[[], object]) -> bool:
    """Run ``action``; False (stop reading) once the call has ended."""
    try:
        action()
    except PlaybackError:
        return False
    return True


async def _control(
    ws: web.WebSocketResponse, call: Call, stream: OutboundStream, text: str
) -> bool:
    """A text frame: ``mark`` or ``clear``; anything else is answered and counted."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        call.count_dropped("unknown_control_message", kind="not JSON")
        await ws.send_json(
            {"error": f'text frame is not JSON ({exc}): send {{"type": "mark", "name": "..."}} '
                      'or {"type": "clear"}'}
        )  # fmt: skip
        return True
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "mark" and isinstance(message.get("name"), str):
        if call.playout is not None and call.playout.pending_marks >= MAX_PENDING_MARKS:
            call.count_dropped("marks_over_limit")
            await ws.send_json(
                {"error": f"{MAX_PENDING_MARKS} marks already wait for their audio: mark "
                          "dropped; mark less often"}
            )  # fmt: skip
            return True
        return _use(lambda: stream.mark(message["name"]))
    if kind == "clear":
        return _use(lambda: call.clear("api"))
    call.count_dropped("unknown_control_message", kind=str(kind)[:40])
    await ws.send_json(
        {"error": 'expected {"type": "mark", "name": "..."} or {"type": "clear"}, '
                  f"got {text[:80]!r}"}
    )  # fmt: skip
    return True


async def _events_out(
    ws: web.WebSocketResponse, svc: EventService, after: int, call_id: str
) -> None:
    """The call's committed events, as ``/v1/events/ws`` sends them; closes after the last.
    A client gone without a close frame ends it quietly (``ConnectionResetError``)."""
    with contextlib.suppress(ConnectionResetError):
        async for stored in follow(svc.outbox, svc.live, after, Filter(call_id, [])):
            if ws.closed:
                return
            if stored is None:
                continue
            await ws.send_str(f'{{"cursor":{stored.pos},"event":{stored.body.decode()}}}')
            if stored.event.type == "call.ended":
                await ws.close()
                return


def add_routes(app: web.Application, limits: TalkbackLimits) -> None:
    app[LIMITS] = limits
    app.router.add_post("/v1/calls/{call_id}/play", play)
    app.router.add_post("/v1/calls/{call_id}/clear", clear)
    app.router.add_post("/v1/calls/{call_id}/dtmf", dtmf)
    app.router.add_get("/v1/calls/{call_id}/audio", audio_socket)
