"""What voxphone checks and rewrites in WebRTC signaling, sans I/O.

aiortc does the offer/answer; this module decides *before* aiortc sees an offer whether it is
one voxphone can serve (so a bad one gets a precise 4xx and no peer connection is made), picks
the one audio codec to answer with, parses WHIP trickle-ICE fragments, makes voxphone the DTLS
server when the offerer lets it choose, asks for Opus no wider than the model hears, and adds a
1:1-NAT public address to the answer's candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from voxphone.audio.codecs import G722, OPUS, PCMA, PCMU, Codec
from voxphone.errors import TransportError
from voxphone.transports.sdp import OPUS_FMTP, Media, Offer, parse_sdp

#: A browser offer with audio, video and a data channel is 5-12 kB; this leaves room.
MAX_OFFER_BYTES = 64 * 1024

#: rtpmap encodings (lower-case ``name/rate``) aiortc receives and voxphone decodes, with the
#: codec each becomes.
WEBRTC_CODECS: dict[str, Codec] = {
    "opus/48000": OPUS,
    "pcmu/8000": PCMU,
    "pcma/8000": PCMA,
    "g722/8000": G722,
}


class Unsupported(TransportError):
    """A well-formed offer voxphone cannot answer: no audio, no common codec, nothing sent."""


@dataclass(frozen=True)
class OfferPlan:
    """How to answer an offer: which codec, and what to do with each m= line (in order)."""

    codec: Codec
    mime_type: str  # e.g. "audio/opus", as aiortc's capabilities name it
    kinds: list[str]  # m= line kinds in order: "audio", "video", "application", ...
    #: The browser also receives audio (``sendrecv``, the default): the answer can send the
    #: bot's voice back. A WHIP client offers ``sendonly``: nothing can go back.
    receives: bool = False


def plan_offer(text: str, opus: bool = True) -> OfferPlan:
    """Check a browser's offer; ``TransportError`` names why voxphone cannot answer it.
    ``opus``: whether Opus can be decoded here (``audio.opus.available``); if not, the offer's
    next codec is chosen (browsers offer PCMU and PCMA too)."""
    offer = parse_sdp(text, max_bytes=MAX_OFFER_BYTES)
    if None in ice_credentials(text):
        raise TransportError("offer has no a=ice-ufrag and a=ice-pwd: WebRTC needs both for ICE")
    if not re.search(r"^a=fingerprint:\S+ \S", text, re.MULTILINE):
        raise TransportError("offer has no a=fingerprint: WebRTC needs it for DTLS")
    audio = _first_audio(offer)
    codec, mime = _choose_codec(audio.rtpmap, audio.formats, opus)
    receives = (audio.direction or offer.direction or "sendrecv") == "sendrecv"
    return OfferPlan(codec, mime, [m.kind for m in offer.media], receives)


def _first_audio(offer: Offer) -> Media:
    audio = [m for m in offer.media if m.kind == "audio"]
    if not audio:
        kinds = ", ".join(m.kind for m in offer.media) or "none"
        raise Unsupported(f"offer has no audio m= line (media: {kinds})")
    m = audio[0]
    if "SAVPF" not in m.proto:
        raise Unsupported(f"audio m= line protocol {m.proto} is not WebRTC's (…/SAVPF)")
    if m.port == 0:
        raise Unsupported("the offer's audio m= line is disabled (port 0)")
    direction = m.direction or offer.direction
    if direction in ("recvonly", "inactive"):
        raise Unsupported(f"the offer's audio is {direction}: the browser would send none")
    return m


def _choose_codec(rtpmap: dict[int, str], formats: list[int], opus: bool) -> tuple[Codec, str]:
    """The offer's most preferred codec that voxphone decodes (browsers list opus first)."""
    for pt in formats:
        encoding = rtpmap.get(pt, "").lower().split("/")
        codec = WEBRTC_CODECS.get("/".join(encoding[:2]))
        if codec is not None and (opus or codec is not OPUS):
            return codec, f"audio/{encoding[0]}"
    offered = ", ".join(rtpmap.get(pt, str(pt)) for pt in formats) or "none"
    takes = "opus, PCMU, PCMA or G722" if opus else "PCMU, PCMA or G722 (libopus is missing)"
    raise Unsupported(f"no common audio codec: voxphone takes {takes}; offered: {offered}")


@dataclass(frozen=True)
class TrickleCandidate:
    mid: str | None
    candidate: str  # the part after "a=candidate:"


def parse_sdpfrag(text: str) -> tuple[list[TrickleCandidate], bool]:
    """A WHIP PATCH body (RFC 8840 ``application/trickle-ice-sdpfrag``): candidates, and
    whether it says ``a=end-of-candidates``. ``TransportError`` for anything unparsable."""
    mid: str | None = None
    candidates: list[TrickleCandidate] = []
    end = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith(("a=", "m=")):
            raise TransportError(f"sdpfrag line {n}: expected a= or m=, got {line[:40]!r}")
        if line.startswith("a=mid:"):
            mid = line[6:]
        elif line.startswith("a=candidate:"):
            value = line[12:]
            if len(value.split()) < 8:
                raise TransportError(f"sdpfrag line {n}: malformed candidate {value[:60]!r}")
            candidates.append(TrickleCandidate(mid, value))
        elif line == "a=end-of-candidates":
            end = True
    return candidates, end


def ice_credentials(text: str) -> tuple[str | None, str | None]:
    """The ``a=ice-ufrag`` and ``a=ice-pwd`` of an SDP or sdpfrag (a change means ICE restart)."""
    ufrag = re.search(r"^a=ice-ufrag:(\S+)", text, re.MULTILINE)
    pwd = re.search(r"^a=ice-pwd:(\S+)", text, re.MULTILINE)
    return (ufrag.group(1) if ufrag else None, pwd.group(1) if pwd else None)


def announce_public_ip(sdp: str, public_ip: str) -> str:
    """Add, after each IPv4 host candidate, the same candidate at ``public_ip``.

    Behind a 1:1 NAT (a cloud VM's elastic IP, a container's published ports) the browser
    reaches the private socket through the public address; the private candidate stays for
    clients on the same network.
    """
    out: list[str] = []
    for line in sdp.split("\r\n"):
        out.append(line)
        fields = line.split()
        if line.startswith("a=candidate:") and fields[7:8] == ["host"] and "." in fields[4]:
            fields[0] += "n"  # its own foundation
            fields[4] = public_ip
            out.append(" ".join(fields))
    return "\r\n".join(out)


def answer_dtls_passive(offer: str, answer: str) -> str:
    """``answer`` with ``a=setup:active`` made ``a=setup:passive`` when every ``a=setup`` of the
    ``offer`` is ``actpass``; otherwise ``answer`` unchanged (an offer that chose a role keeps it).

    Why: aiortc answers ``actpass`` as ``active`` and so becomes the DTLS *client*, offering only
    ECDHE-ECDSA suites; a peer whose DTLS server holds an RSA certificate (GStreamer's
    ``webrtcbin``, so ``whipclientsink``) then fails with ``no shared cipher``. As the DTLS
    *server*, aiortc's ECDSA certificate is accepted by browsers, aiortc and GStreamer alike.
    RFC 5763 section 5 (updated by RFC 8842) lets the answerer of an ``actpass`` offer pick
    ``active`` or ``passive``. aiortc has no API for the answer's role, but
    ``setLocalDescription`` takes the role from the answer it is given, so rewriting the SDP
    before that call sets it.
    """
    offered = set(re.findall(r"^a=setup:(\w+)", offer, re.MULTILINE))
    if offered != {"actpass"}:
        return answer
    return re.sub(r"^a=setup:active(?=\r?$)", "a=setup:passive", answer, flags=re.MULTILINE)


#: An Opus rtpmap (RFC 7587 §7: ``opus/48000/2``) and any fmtp line, each giving its payload type.
_OPUS_RTPMAP = re.compile(r"a=rtpmap:(\d+) opus/48000\b", re.IGNORECASE)
_FMTP = re.compile(r"a=fmtp:(\d+)(?:[ \t]+(.*))?$")


def answer_opus_fmtp(answer: str) -> str:
    """``answer`` with voxphone's Opus format parameters (``sdp.OPUS_FMTP``: ``maxplaybackrate``,
    RFC 7587 §6.1) on each Opus payload type of each media section: added to its ``a=fmtp``
    line (a parameter of the same name there is replaced), or as one after its ``a=rtpmap``.
    Every section gets them: sections bundled on one transport must give a payload type the
    same parameters (libwebrtc refuses a BUNDLE group whose sections differ).

    Why: aiortc's answer carries no Opus parameters, and a browser (libwebrtc) reads this one
    from the answer to cap its encoder's bandwidth (``OPUS_SET_MAX_BANDWIDTH``): at 16 kHz
    Chromium codes wideband SILK at 20 kbit/s instead of fullband SILK and CELT at 32 —
    nothing voxphone can hear is lost, and each packet decodes in about half the CPU."""
    lines = answer.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")]
    eol = "\r\n" if "\r\n" in answer else "\n"
    return "".join(
        "".join(_with_opus_fmtp(lines[a:b], eol))
        for a, b in zip([0, *starts], [*starts, len(lines)], strict=True)
    )


def _with_opus_fmtp(lines: list[str], eol: str) -> list[str]:
    """One SDP section's lines (each with its line break, but perhaps the last), ``OPUS_FMTP``
    on each of its Opus payload types (``answer_opus_fmtp``)."""
    opus = {m.group(1) for line in lines if (m := _OPUS_RTPMAP.match(line))}
    ours = {param.split("=", 1)[0] for param in OPUS_FMTP.split(";")}
    out, has_fmtp = [], set()
    for line in lines:
        text = line.rstrip("\r\n")
        fmtp = _FMTP.match(text)
        if fmtp is not None and fmtp.group(1) in opus:
            pt = fmtp.group(1)
            params = [p.strip() for p in (fmtp.group(2) or "").split(";") if p.strip()]
            kept = [p for p in params if p.split("=", 1)[0].strip().lower() not in ours]
            line = f"a=fmtp:{pt} {';'.join([*kept, OPUS_FMTP])}{line[len(text) :]}"
            has_fmtp.add(pt)
        out.append(line)
    for pt in sorted(opus - has_fmtp):
        i = next(i for i, line in enumerate(out) if (m := _OPUS_RTPMAP.match(line)) and m[1] == pt)
        text = out[i].rstrip("\r\n")
        line_break = out[i][len(text) :]
        out[i] = text + (line_break or eol)
        out.insert(i + 1, f"a=fmtp:{pt} {OPUS_FMTP}{line_break}")
    return out
