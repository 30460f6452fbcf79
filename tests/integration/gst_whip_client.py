"""A WHIP publisher built on GStreamer's ``webrtcbin``, as ``whipclientsink`` and many embedded
and media-server publishers are: plays a WAV file as one call, hangs up, prints the events the
call's data channel returned (one JSON envelope a line) and exits 0 once ``call.ended`` came.

Run by the system Python, which has Debian's GStreamer bindings (``python3-gi``):
``/usr/bin/python3 gst_whip_client.py WHIP_URL FILE.wav {opus|pcmu|pcma}``. It imports nothing
from voxphone. Not a pytest module (tests/integration/test_gstreamer.py runs it).

The offer is webrtcbin's own (``a=setup:actpass``, its RSA DTLS certificate), sent once ICE
gathering completes (WHIP without trickle). Exit status 1 and a reason on stderr when the call
does not complete within the time limit (e.g. DTLS ``no shared cipher``).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("Nice", "0.1")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC, Nice  # noqa: E402

#: codec → (encoder branch, RTP caps); PCMU/PCMA are 8 kHz mono by definition (RFC 3551).
BRANCHES = {
    "opus": ("opusenc ! rtpopuspay pt=111", "OPUS,payload=111,clock-rate=48000"),
    "pcmu": ("audio/x-raw,rate=8000,channels=1 ! mulawenc ! rtppcmupay", "PCMU,payload=0"),
    "pcma": ("audio/x-raw,rate=8000,channels=1 ! alawenc ! rtppcmapay", "PCMA,payload=8"),
}
LIMIT_S = 90


class Publisher:
    """One call: pipeline, offer/answer over WHIP, events from the data channel."""

    def __init__(self, url: str, wav: str, codec: str) -> None:
        enc, caps = BRANCHES[codec]
        self.caps = f"application/x-rtp,media=audio,encoding-name={caps}"
        self.url, self.location = url, ""
        self.loop = GLib.MainLoop()
        self.ended = False
        self.pipe = Gst.parse_launch(
            f"filesrc location={wav} ! wavparse ! identity name=pace sync=true ! audioconvert"
            f" ! audioresample ! {enc} ! {self.caps} ! identity name=gate"
            " ! webrtcbin name=w bundle-policy=max-bundle"
        )
        self.w = self.pipe.get_by_name("w")
        self._loopback_only()
        self.w.connect("on-negotiation-needed", self._negotiate)
        self.w.connect("notify::ice-gathering-state", self._gathered)
        self.w.connect("notify::connection-state", self._connected)
        # Media waits for DTLS, as a microphone's would not be sent before either.
        gate = self.pipe.get_by_name("gate").get_static_pad("src")
        block = Gst.PadProbeType.BLOCK | Gst.PadProbeType.BUFFER
        self._gate = (gate, gate.add_probe(block, lambda *_: Gst.PadProbeReturn.OK))
        pace = self.pipe.get_by_name("pace").get_static_pad("src")
        pace.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_event)

    def run(self) -> int:
        http(self.url.rsplit("/v1/", 1)[0] + "/health", "GET", None, "text/plain")
        self.pipe.set_state(Gst.State.PLAYING)
        GLib.timeout_add_seconds(LIMIT_S, self._give_up)
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        return 0 if self.ended else 1

    def _loopback_only(self) -> None:
        """Gather on 127.0.0.1 alone. libnice skips loopback interfaces (and in a network
        namespace with only ``lo`` it never finishes gathering), so name the address."""
        address = Nice.Address()
        address.set_from_string("127.0.0.1")
        # Held for the process's life: PyGObject drops a reference it never took when this
        # wrapper goes (webrtcbin's ICE object would be freed under it).
        self.ice = self.w.get_property("ice-agent")
        self.ice.get_property("agent").add_local_address(address)

    # -- signalling ------------------------------------------------------------------------

    def _negotiate(self, w: Any) -> None:
        transceiver = w.emit("get-transceiver", 0)
        transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        # The codec's caps may not have reached webrtcbin yet (media waits for DTLS).
        transceiver.set_property("codec-preferences", Gst.Caps.from_string(self.caps))
        channel = w.emit("create-data-channel", "events", None)
        channel.connect("on-message-string", self._on_message)
        self.channel = channel  # keep a reference
        w.emit("create-offer", None, Gst.Promise.new_with_change_func(self._offer_made, w))

    def _offer_made(self, promise: Any, w: Any) -> None:
        reply = promise.get_reply()  # held: the offer lives inside it
        offer = reply.get_value("offer")
        w.emit("set-local-description", offer, Gst.Promise.new())

    def _gathered(self, w: Any, _spec: Any) -> None:
        if w.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(self._post_offer)

    def _post_offer(self) -> bool:
        offer = self.w.get_property("local-description").sdp.as_text()
        status, headers, body = http(self.url, "POST", offer.encode(), "application/sdp")
        if status != 201:
            return self._fail(f"WHIP POST answered {status}: {body[:300]!r}")
        self.location = urllib.request.urljoin(self.url, headers["Location"])
        setup = [x for x in body.decode().splitlines() if x.startswith("a=setup:")]
        print(f"answer {setup[:1]}", file=sys.stderr)
        _, sdp = GstSdp.SDPMessage.new_from_text(body.decode())
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdp)
        self.w.emit("set-remote-description", answer, Gst.Promise.new())
        return False

    # -- the call ----------------------------------------------------------------------------

    def _connected(self, w: Any, _spec: Any) -> None:
        state = w.get_property("connection-state")
        print(f"connection {state.value_nick}", file=sys.stderr)
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED and self._gate:
            pad, probe = self._gate
            self._gate = None
            pad.remove_probe(probe)

    def _on_event(self, _pad: Any, info: Any) -> Any:
        if info.get_event().type == Gst.EventType.EOS:
            GLib.timeout_add(300, self._hang_up)  # played (and sent): hang up, as WHIP clients do
        return Gst.PadProbeReturn.OK

    def _hang_up(self) -> bool:
        if self.location:
            http(self.location, "DELETE", b"", "application/sdp")
        return False

    def _on_message(self, _channel: Any, text: str) -> None:
        print(text, flush=True)
        if json.loads(text).get("type") == "call.ended":
            self.ended = True
            self.loop.quit()

    def _give_up(self) -> bool:
        return self._fail(f"no call.ended within {LIMIT_S} s (ICE/DTLS never completed?)")

    def _fail(self, reason: str) -> bool:
        print(reason, file=sys.stderr)
        self.loop.quit()
        return False


def http(
    url: str, method: str, body: bytes | None, ctype: str
) -> tuple[int, dict[str, str], bytes]:
    """One request, retried while voxphone is still starting (connection refused), 30 s."""
    request = urllib.request.Request(url, body, {"Content-Type": ctype}, method=method)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    Gst.init(None)
    sys.exit(Publisher(*sys.argv[1:4]).run())
