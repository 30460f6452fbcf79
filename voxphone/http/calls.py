"""``/v1/calls``: SIP gateways and their controllers create RTP calls, by JSON or SDP offer.

``POST`` allocates a port from the RTP range for one call and answers where to send media;
``DELETE /v1/calls/{id}`` hangs up. Mistakes are answered with a 4xx and a message naming the
field or SDP line; nothing is allocated for a refused request.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from voxphone.audio.codecs import STATIC_PAYLOAD_TYPES, Codec, codec_by_name
from voxphone.call import Call, new_call_id
from voxphone.errors import DecodeError, TransportError
from voxphone.events.service import EventService
from voxphone.events.ssrf import RefusedUrl
from voxphone.http.api import REGISTRY, error, invalid
from voxphone.transports.rtp import Reservation, RtpPort, RtpServer
from voxphone.transports.sdp import answer, parse_sdp

RTP = web.AppKey("rtp", RtpServer)
ADVERTISE = web.AppKey("advertise_host", str)
WEBHOOKS = web.AppKey("webhooks", EventService)


class CreateCall(BaseModel):
    """The JSON body of ``POST /v1/calls``."""

    model_config = ConfigDict(extra="forbid")

    codec: str = "PCMU"
    #: Required for codecs without a static payload type (opus, L16).
    payload_type: int | None = Field(None, ge=0, le=127)
    telephone_event: int | None = Field(101, ge=96, le=127)
    #: Only accept media from this IP address (else: the first valid source latches).
    remote_ip: str | None = None
    #: This call's events go here instead of the configured webhook URL.
    #: Checked by ``HostPolicy.check_url`` (scheme, host, addresses): one message for all.
    webhook_url: str | None = Field(None, max_length=2048)
    metadata: dict[str, str | int | float | bool | None] = {}

    @field_validator("remote_ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        """An address as sockets report it (``"192.0.2.1"``), or latching would never match."""
        if value is None:
            return None
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
        return str(getattr(ip, "ipv4_mapped", None) or ip)


async def create_call(request: web.Request) -> web.Response:
    if request.content_type == "application/sdp":
        return await _from_sdp(request)
    if request.content_type == "application/json":
        return await _from_json(request)
    return error(
        415, f"Content-Type {request.content_type!r}: send application/json or application/sdp"
    )


async def _from_json(request: web.Request) -> web.Response:
    try:
        body = CreateCall.model_validate(json.loads(await request.text() or "{}"))
        codec = codec_by_name(body.codec)
    except json.JSONDecodeError as exc:
        return error(400, f"body is not JSON: {exc}")
    except ValidationError as exc:
        return error(400, invalid(exc))
    except DecodeError as exc:
        return error(422, f"codec: {exc}")
    if body.webhook_url is not None:
        try:
            await request.app[WEBHOOKS].url_policy.check_url(body.webhook_url)
        except RefusedUrl as exc:
            return error(400, f"webhook_url: {exc}")
    pt = body.payload_type if body.payload_type is not None else _static_pt(codec)
    if pt is None:
        return error(
            400, f"payload_type: {codec.name} has no static payload type; give one (96-127)"
        )
    opened = await _open(
        request, codec, pt, body.telephone_event, body.remote_ip, dict(body.metadata),
        webhook_url=body.webhook_url,
    )  # fmt: skip
    if isinstance(opened, web.Response):
        return opened
    call, port = opened
    reply = {
        "call_id": call.call_id,
        "rtp_host": request.app[ADVERTISE],
        "rtp_port": port.port,
        "codec": codec.name,
        "payload_type": pt,
    }
    return web.json_response(reply, status=201, headers={"Location": f"/v1/calls/{call.call_id}"})


async def _from_sdp(request: web.Request) -> web.Response:
    rtp = request.app[RTP]
    try:
        offer = parse_sdp(await request.text())
        port = rtp.allocate()
    except TransportError as exc:
        status = 503 if "no free RTP port" in str(exc) else 400
        return error(status, str(exc))
    try:
        ans = answer(offer, request.app[ADVERTISE], port.port, uuid.uuid4().int % 10**10)
    except TransportError as exc:
        rtp.release(port)
        return error(422, str(exc))  # SIP would say 488 Not Acceptable Here
    # The offer's address is a hint, not a filter: behind NAT media comes from elsewhere.
    opened = await _open(
        request, ans.codec, ans.payload_type, ans.telephone_event, None, {}, port,
        hint=ans.remote, codecs=ans.formats, sends=ans.sends,
    )  # fmt: skip
    if isinstance(opened, web.Response):
        return opened
    call, _ = opened
    headers = {"Location": f"/v1/calls/{call.call_id}", "X-Call-Id": call.call_id}
    return web.Response(status=201, text=ans.sdp, content_type="application/sdp", headers=headers)


def _static_pt(codec: Codec) -> int | None:
    return next((pt for pt, c in STATIC_PAYLOAD_TYPES.items() if c is codec), None)


async def _open(
    request: web.Request,
    codec: Codec,
    pt: int,
    dtmf: int | None,
    remote_ip: str | None,
    metadata: dict[str, Any],
    port: RtpPort | None = None,
    webhook_url: str | None = None,
    hint: tuple[str, int] | None = None,
    codecs: dict[int, Codec] | None = None,
    sends: bool = True,
) -> tuple[Call, RtpPort] | web.Response:
    registry, rtp = request.app[REGISTRY], request.app[RTP]
    try:
        port = port or rtp.allocate()
    except TransportError as exc:
        return error(503, str(exc))
    expected = remote_ip or (hint[0] if hint else None)
    meta = {**metadata, "local_port": port.port, "expected_remote_ip": expected}
    call_id = new_call_id()
    if webhook_url is not None:
        request.app[WEBHOOKS].route(call_id, webhook_url)
    call = registry.open(codec, transport="rtp", metadata=meta, call_id=call_id)
    if call is None:
        request.app[WEBHOOKS].unroute(call_id)
        rtp.release(port)
        return error(503, "not accepting calls: at the concurrent call limit, or draining")
    reservation = Reservation(
        call, pt, dtmf, expected_ip=remote_ip, created=registry.clock.monotonic(), hint=hint,
        codecs=codecs, sends=sends,
    )  # fmt: skip
    port.reserve(reservation)
    return call, port


async def end_call(request: web.Request) -> web.Response:
    registry, call_id = request.app[REGISTRY], request.match_info["call_id"]
    call = registry.calls.get(call_id)
    if call is None:
        if call_id in registry.ended:
            return error(410, f"call {call_id!r} has ended")
        return error(404, f"no live call {call_id!r}: GET /v1/calls lists them")
    # Through its transport's endpoint: it stops the media (and plays out what it holds).
    call.hangup("hangup")
    return web.Response(status=204)


def add_routes(
    app: web.Application, rtp: RtpServer, advertise_host: str, webhooks: EventService
) -> None:
    app[WEBHOOKS] = webhooks
    app[RTP] = rtp
    app[ADVERTISE] = advertise_host
    app.router.add_post("/v1/calls", create_call)
    app.router.add_delete("/v1/calls/{call_id}", end_call)
