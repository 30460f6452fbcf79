#!/usr/bin/env python3
"""Bridge every call that enters a Stasis app to voxphone with ARI externalMedia (RTP).

    python ari_controller.py --ari http://127.0.0.1:8088 --user voxphone --password secret \
        --voxphone http://127.0.0.1:8080 [--format ulaw|slin16]

For each caller channel entering the app: answer it, ask voxphone for an RTP port
(``POST /v1/calls``), create a mixing bridge, create an externalMedia channel that sends the
bridge's audio to that port, and bridge the two. When the caller leaves: ``DELETE`` the voxphone
call (its transcript is flushed and ``call.ended`` is sent) and tear the bridge down.
Needs only aiohttp (installed with voxphone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("ari_controller")

#: Asterisk's fixed RTP payload types for externalMedia (no SDP negotiation happens).
FORMATS = {"ulaw": {"codec": "PCMU"}, "slin16": {"codec": "L16/16000", "payload_type": 118}}


@dataclass
class Bridged:
    bridge_id: str
    media_channel_id: str
    voxphone_call: str


class Controller:
    def __init__(self, http: aiohttp.ClientSession, ari: str, app: str, voxphone: str, fmt: str):
        self.http, self.ari, self.app, self.voxphone, self.fmt = http, ari, app, voxphone, fmt
        self.calls: dict[str, Bridged] = {}
        self.ours: set[str] = set()  # externalMedia channels we made (they enter Stasis too)

    async def run(self) -> None:
        ws_url = self.ari.replace("http", "ws", 1) + f"/ari/events?app={self.app}"
        async with self.http.ws_connect(ws_url) as ws:
            log.info("connected to ARI, app %s", self.app)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                try:
                    await self.on_event(event)
                except aiohttp.ClientError as exc:
                    log.error("handling %s failed: %s", event.get("type"), exc)

    async def on_event(self, event: dict[str, Any]) -> None:
        channel = event.get("channel", {})
        if event.get("type") == "StasisStart" and channel.get("id") not in self.ours:
            await self.bridge(channel)
        elif event.get("type") == "StasisEnd" and channel.get("id") in self.calls:
            await self.unbridge(channel["id"])

    async def bridge(self, channel: dict[str, Any]) -> None:
        cid = channel["id"]
        await self.ari_post(f"/ari/channels/{cid}/answer")
        meta = {
            "asterisk_channel": cid,
            "from": channel.get("caller", {}).get("number"),
            "to": channel.get("dialplan", {}).get("exten"),
        }
        body = {**FORMATS[self.fmt], "metadata": meta}
        async with self.http.post(f"{self.voxphone}/v1/calls", json=body) as r:
            r.raise_for_status()
            call = await r.json()
        bridge = await self.ari_post("/ari/bridges", type="mixing")
        media = await self.ari_post(
            "/ari/channels/externalMedia",
            app=self.app,
            external_host=f"{call['rtp_host']}:{call['rtp_port']}",
            format=self.fmt,
        )
        self.ours.add(media["id"])
        await self.ari_post(
            f"/ari/bridges/{bridge['id']}/addChannel", channel=f"{cid},{media['id']}"
        )
        self.calls[cid] = Bridged(bridge["id"], media["id"], call["call_id"])
        log.info("channel %s -> voxphone call %s", cid, call["call_id"])

    async def unbridge(self, cid: str) -> None:
        b = self.calls.pop(cid)
        async with self.http.delete(f"{self.voxphone}/v1/calls/{b.voxphone_call}"):
            pass
        await self.ari_delete(f"/ari/channels/{b.media_channel_id}")
        await self.ari_delete(f"/ari/bridges/{b.bridge_id}")
        self.ours.discard(b.media_channel_id)

    async def ari_post(self, path: str, **params: str) -> Any:
        async with self.http.post(self.ari + path, params=params) as r:
            r.raise_for_status()
            return await r.json() if r.content_type == "application/json" else None

    async def ari_delete(self, path: str) -> None:
        async with self.http.delete(self.ari + path) as r:
            if r.status not in (204, 404):  # 404: Asterisk already hung it up
                r.raise_for_status()


async def main(args: argparse.Namespace) -> None:
    auth = aiohttp.BasicAuth(args.user, args.password)
    async with aiohttp.ClientSession(auth=auth) as http:
        await Controller(http, args.ari, args.app, args.voxphone, args.format).run()


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ari", default="http://127.0.0.1:8088", help="Asterisk's HTTP server")
    p.add_argument("--user", default="voxphone")
    p.add_argument("--password", required=True)
    p.add_argument("--app", default="voxphone", help="the Stasis app name in the dialplan")
    p.add_argument("--voxphone", default="http://127.0.0.1:8080")
    p.add_argument("--format", choices=sorted(FORMATS), default="ulaw")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(p.parse_args()))
