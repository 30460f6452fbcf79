"""Browser-call signaling: WHIP (RFC 9725) at ``/v1/whip``, a JSON offer/answer, the demo page.

WHIP: ``POST`` an SDP offer → ``201`` with the answer and the session's ``Location``; ``PATCH``
that location with a trickle-ICE sdpfrag (RFC 8840) to add candidates; ``DELETE`` it to hang up.
The session id is the call id, so ``DELETE /v1/calls/{id}`` hangs up too.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import aiohttp_cors
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voxphone.errors import TransportError
from voxphone.http.api import error, invalid, refusal
from voxphone.transports.ice import Unavailable
from voxphone.transports.webrtc import Session, WebRtcGateway
from voxphone.transports.webrtc_sdp import (
    MAX_OFFER_BYTES,
    Unsupported,
    ice_credentials,
    parse_sdpfrag,
)

GATEWAY = web.AppKey("webrtc", WebRtcGateway)
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
STATIC = resources.files("voxphone") / "http" / "static"


class JsonOffer(BaseModel):
    """The body of ``POST /v1/webrtc/offer``: what ``RTCPeerConnection.localDescription`` is."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern="^offer$")
    sdp: str
    metadata: dict[str, str | int | float | bool | None] = {}


async def _read_body(request: web.Request) -> str:
    if (request.content_length or 0) > MAX_OFFER_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_OFFER_BYTES, actual_size=request.content_length or 0
        )
    body = await request.content.read(MAX_OFFER_BYTES + 1)
    if len(body) > MAX_OFFER_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_OFFER_BYTES, actual_size=len(body))
    try:
        return body.decode()
    except UnicodeDecodeError as exc:
        raise refusal(web.HTTPBadRequest, f"body is not UTF-8: {exc}") from exc


def _client(request: web.Request) -> dict[str, Any]:
    return {"remote": request.remote, "user_agent": request.headers.get("User-Agent", "")[:200]}


async def _answer(request: web.Request, sdp: str, metadata: dict[str, Any]) -> tuple[Session, str]:
    try:
        return await request.app[GATEWAY].answer(sdp, {**_client(request), **metadata})
    except Unavailable as exc:
        retry = {"Retry-After": "5"}
        raise refusal(web.HTTPServiceUnavailable, str(exc), headers=retry) from exc
    except Unsupported as exc:  # well-formed, but nothing voxphone can take
        raise refusal(web.HTTPUnprocessableEntity, str(exc)) from exc
    except TransportError as exc:  # malformed
        raise refusal(web.HTTPBadRequest, str(exc)) from exc


async def whip_offer(request: web.Request) -> web.Response:
    if request.content_type != SDP:
        return error(415, f"Content-Type {request.content_type!r}: a WHIP offer is {SDP}")
    session, answer = await _answer(request, await _read_body(request), {})
    location = f"/v1/whip/{session.session_id}"
    headers = {"Location": location, "X-Call-Id": session.session_id, "ETag": '"1"'}
    return web.Response(status=201, text=answer, content_type=SDP, headers=headers)


async def whip_patch(request: web.Request) -> web.Response:
    session = request.app[GATEWAY].sessions.get(request.match_info["session_id"])
    if session is None:
        return error(404, f"no WHIP session {request.match_info['session_id']!r}")
    if request.content_type != SDPFRAG:
        return error(415, f"Content-Type {request.content_type!r}: trickle ICE is {SDPFRAG}")
    frag = await _read_body(request)
    ufrag, _ = ice_credentials(frag)
    remote = session.pc.remoteDescription
    if ufrag is not None and remote is not None and ufrag != ice_credentials(remote.sdp)[0]:
        return error(422, "ICE restart is not supported: start a new WHIP session")
    try:
        candidates, _end = parse_sdpfrag(frag)
        await session.add_candidates(candidates)
    except TransportError as exc:
        return error(400, str(exc))
    return web.Response(status=204)


async def whip_delete(request: web.Request) -> web.Response:
    session = request.app[GATEWAY].sessions.get(request.match_info["session_id"])
    if session is None:
        return error(404, f"no WHIP session {request.match_info['session_id']!r}")
    session.hangup("hangup")
    return web.Response(status=200)


async def json_offer(request: web.Request) -> web.Response:
    try:
        offer = JsonOffer.model_validate_json(await _read_body(request))
    except ValidationError as exc:
        return error(400, invalid(exc))
    session, answer = await _answer(request, offer.sdp, dict(offer.metadata))
    body = {"type": "answer", "sdp": answer, "call_id": session.session_id}
    return web.json_response(
        body, status=201, headers={"Location": f"/v1/whip/{session.session_id}"}
    )


async def demo_page(request: web.Request) -> web.Response:
    return web.Response(text=(STATIC / "index.html").read_text(), content_type="text/html")


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    kind = next((v for k, v in kinds.items() if name.endswith(k)), None)
    path = STATIC / name
    if kind is None or "/" in name or not path.is_file():
        return error(404, f"no static file {name!r}")
    return web.Response(text=path.read_text(), content_type=kind)


def add_routes(app: web.Application, gateway: WebRtcGateway) -> None:
    app[GATEWAY] = gateway
    signaling = [
        app.router.add_post("/v1/whip", whip_offer),
        app.router.add_patch("/v1/whip/{session_id}", whip_patch),
        app.router.add_delete("/v1/whip/{session_id}", whip_delete),
        app.router.add_post("/v1/webrtc/offer", json_offer),
    ]
    app.router.add_get("/", demo_page)
    app.router.add_get("/static/{name}", static_file)
    if gateway.settings.cors_origins:  # WHIP clients on other web origins
        options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_headers=("Content-Type", "Authorization", "If-Match"),
            expose_headers=("Location", "ETag", "X-Call-Id", "Link"),
        )
        cors = aiohttp_cors.setup(
            app, defaults=dict.fromkeys(gateway.settings.cors_origins, options)
        )
        for route in signaling:
            cors.add(route)
