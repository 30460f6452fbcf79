"""SDP offer/answer for one audio stream (RFC 4566, RFC 3264), sans I/O.

voxphone listens and talks back (bot audio, DTMF: ``voxphone.playback``), so the answer takes the
first audio format of the offer it can decode (and the other decodable ones on the same RTP
clock, which the sender may switch to), plus telephone-event at that clock rate if offered, and
answers ``sendrecv`` — or ``recvonly`` to a ``sendonly`` offer (RFC 3264 §6.1: the offerer will
not receive). voxphone sends in the answer's first format. Everything it cannot use is refused
with a message naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voxphone.audio.codecs import OPUS, STATIC_PAYLOAD_TYPES, Codec, codec_by_name
from voxphone.audio.resample import MODEL_RATE
from voxphone.errors import DecodeError, TransportError

MAX_SDP_BYTES = 16_384
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

#: The Opus format parameters of every answer voxphone gives (RFC 7587 §6.1: in an answer they
#: describe what the answerer receives). ``maxplaybackrate``: nothing above the model's 16 kHz
#: is heard, so the sender need not code it. It is a hint a sender may ignore; one that takes
#: it (libwebrtc's encoder: Chromium 156 does, ``tests/e2e/test_browser.py``) caps its
#: bandwidth at wideband and spends its bits below 8 kHz, and its packets decode in about half
#: the time (SILK alone, not SILK and CELT: ``benchmarks/results/maxplaybackrate-ab``).
#: Everything else is left at the RFC's defaults (mono preferred; no in-band FEC asked for,
#: which voxphone's decoder does not use).
OPUS_MAX_PLAYBACK_RATE = MODEL_RATE
OPUS_FMTP = f"maxplaybackrate={OPUS_MAX_PLAYBACK_RATE}"


@dataclass
class Media:
    kind: str
    port: int
    proto: str
    formats: list[int]
    rtpmap: dict[int, str] = field(default_factory=dict)  # pt -> "encoding/rate[/channels]"
    fmtp: dict[int, str] = field(default_factory=dict)
    ptime: int | None = None
    direction: str | None = None
    connection: str | None = None


@dataclass
class Offer:
    connection: str | None
    direction: str
    media: list[Media]


def parse_sdp(text: str, max_bytes: int = MAX_SDP_BYTES) -> Offer:
    """Parse an SDP body; raise ``TransportError`` naming the offending line."""
    if len(text.encode()) > max_bytes:
        raise TransportError(f"SDP is {len(text.encode())} bytes; the limit is {max_bytes}")
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise TransportError("SDP must start with 'v=0'")
    offer = Offer(None, "sendrecv", [])
    for n, line in enumerate(lines, 1):
        if len(line) < 2 or line[1] != "=":
            raise TransportError(f"SDP line {n}: expected '<type>=<value>', got {line[:40]!r}")
        kind, value = line[0], line[2:]
        media = offer.media[-1] if offer.media else None
        if kind == "m":
            offer.media.append(_media(n, value))
        elif kind == "c":
            addr = _connection(n, value)
            if media is None:
                offer.connection = addr
            else:
                media.connection = addr
        elif kind == "a":
            _attribute(n, value, offer, media)
    return offer


def _media(n: int, value: str) -> Media:
    parts = value.split()
    if len(parts) < 4 or not parts[1].split("/")[0].isdecimal():
        raise TransportError(f"SDP line {n}: malformed m= line {value[:60]!r}")
    try:
        formats = [int(f) for f in parts[3:]]
    except ValueError:
        formats = []  # non-RTP media (e.g. an application/data channel): never chosen
    return Media(parts[0], int(parts[1].split("/")[0]), parts[2], formats)


def _connection(n: int, value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise TransportError(f"SDP line {n}: malformed c= line {value[:60]!r}")
    return parts[2].split("/")[0]


def _attribute(n: int, value: str, offer: Offer, media: Media | None) -> None:
    name, _, arg = value.partition(":")
    if name in DIRECTIONS:
        if media is None:
            offer.direction = name
        else:
            media.direction = name
    elif media is None:
        return
    elif name in ("rtpmap", "fmtp"):
        pt_text, _, rest = arg.partition(" ")
        if not pt_text.isdecimal() or not rest:
            raise TransportError(f"SDP line {n}: malformed a={name} {arg[:60]!r}")
        (media.rtpmap if name == "rtpmap" else media.fmtp)[int(pt_text)] = rest.strip()
    elif name == "ptime" and arg.strip().isdecimal():
        media.ptime = int(arg)


@dataclass(frozen=True)
class Answer:
    sdp: str
    codec: Codec
    payload_type: int
    telephone_event: int | None
    remote: tuple[str, int] | None  # where the offerer says it sends from: a hint (NAT)
    #: Every format the answer accepts (``payload_type`` first), for switches mid-stream.
    formats: dict[int, Codec] = field(default_factory=dict)
    #: Whether voxphone may send media (the answer is ``sendrecv``, not ``recvonly``).
    sends: bool = True


_ENCODINGS = {"pcmu": "PCMU", "pcma": "PCMA", "g722": "G722", "opus": "opus"}


def _codec_for(pt: int, rtpmap: dict[int, str]) -> Codec | None:
    """The codec a payload type names: its a=rtpmap, or the RFC 3551 static table."""
    mapping = rtpmap.get(pt)
    if mapping is None:
        return STATIC_PAYLOAD_TYPES.get(pt)
    enc, rate, channels = (*mapping.split("/"), "", "")[:3]
    channels = channels or "1"
    name = _ENCODINGS.get(enc.lower())
    if enc.lower() == "l16" and channels == "1":
        name = f"L16/{rate}"
    if name is None:
        return None
    try:
        return codec_by_name(name)
    except DecodeError:
        return None  # e.g. L16 at a rate we have no codec entry for


def answer(offer: Offer, host: str, port: int, session_id: int) -> Answer:
    """Choose a format and build the answer; ``TransportError`` says why there is none."""
    audio = [m for m in offer.media if m.kind == "audio"]
    if not audio:
        kinds = ", ".join(m.kind for m in offer.media) or "none"
        raise TransportError(f"SDP offer has no audio stream (media: {kinds})")
    m = next((m for m in audio if m.port != 0), None)
    if m is None:
        raise TransportError("SDP offer's audio streams are all disabled (port 0)")
    if not m.proto.startswith("RTP/AVP"):
        raise TransportError(f"SDP audio protocol {m.proto} is not plain RTP (RTP/AVP)")
    direction = m.direction or offer.direction
    if direction in ("recvonly", "inactive"):
        raise TransportError(f"SDP offer is {direction}: the caller would send no audio")
    formats = _formats(m)
    pt, codec = next(iter(formats.items()))
    dtmf = _telephone_event(m, codec)
    sends = direction != "sendonly"
    pts = [*formats, *([dtmf] if dtmf is not None else [])]
    sdp = _render(host, port, session_id, pts, m, "sendrecv" if sends else "recvonly")
    return Answer(sdp, codec, pt, dtmf, _remote(offer, m), formats, sends)


def _formats(m: Media) -> dict[int, Codec]:
    """What the answer accepts, the offer's preferred decodable format first: every decodable
    format on that one's RTP clock rate. RFC 3264 §6.1 lets the offerer send any format the
    answer lists and switch among them mid-stream (G.722 and PCMA both run an 8000 Hz clock,
    RFC 3551 §4.5.2); one clock keeps the call's timeline and telephone-events on one clock."""
    decodable = {pt: c for pt in m.formats if (c := _codec_for(pt, m.rtpmap)) is not None}
    if not decodable:
        offered = ", ".join(m.rtpmap.get(pt, str(pt)) for pt in m.formats)
        raise TransportError(f"SDP offer has no codec voxphone decodes (offered: {offered})")
    rate = next(iter(decodable.values())).clock_rate
    return {pt: c for pt, c in decodable.items() if c.clock_rate == rate}


def _telephone_event(m: Media, codec: Codec) -> int | None:
    """The offered telephone-event at the chosen codec's RTP clock rate: RFC 4733 §2.1 has
    events share the audio stream's clock (Opus: 48000, RFC 7587; G.722: 8000, RFC 3551
    §4.5.2), so an offer may list one per rate and the answer must pick the matching one."""
    want = ["telephone-event", str(codec.clock_rate)]
    return next((p for p in m.formats if m.rtpmap.get(p, "").lower().split("/")[:2] == want), None)


def _remote(offer: Offer, m: Media) -> tuple[str, int] | None:
    addr = m.connection or offer.connection
    return (addr, m.port) if addr and addr not in ("0.0.0.0", "::") else None


def _render(host: str, port: int, sid: int, pts: list[int], m: Media, direction: str) -> str:
    ip = "IP6" if ":" in host else "IP4"
    lines = [
        "v=0",
        f"o=voxphone {sid} {sid} IN {ip} {host}",
        "s=voxphone",
        f"c=IN {ip} {host}",
        "t=0 0",
        f"m=audio {port} {m.proto} {' '.join(map(str, pts))}",
    ]
    for p in pts:
        if p in m.rtpmap:
            lines.append(f"a=rtpmap:{p} {m.rtpmap[p]}")
        if _codec_for(p, m.rtpmap) is OPUS:  # ours, not the offerer's (``OPUS_FMTP``)
            lines.append(f"a=fmtp:{p} {OPUS_FMTP}")
        elif p in m.fmtp:
            lines.append(f"a=fmtp:{p} {m.fmtp[p]}")
    if m.ptime:
        lines.append(f"a=ptime:{m.ptime}")
    lines.append(f"a={direction}")
    return "\r\n".join(lines) + "\r\n"
