"""SDP offer/answer for a receive-only audio stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.sdp import answer, parse_sdp

ASTERISK_OFFER = """v=0
o=- 1234 1234 IN IP4 192.0.2.5
s=Asterisk
c=IN IP4 192.0.2.5
t=0 0
m=audio 17000 RTP/AVP 9 0 8 101
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendrecv
"""


def offer(m: str, *attrs: str, c: str = "c=IN IP4 192.0.2.5") -> str:
    return "\r\n".join(["v=0", "o=- 1 1 IN IP4 x", "s=-", c, "t=0 0", m, *attrs]) + "\r\n"


def test_asterisk_offer_gets_g722_with_telephone_event_sendrecv() -> None:
    """G.722 first; PCMU and PCMA share its 8000 Hz RTP clock, so they are accepted too and the
    sender may switch to them mid-stream (RFC 3264 §6.1)."""
    a = answer(parse_sdp(ASTERISK_OFFER), "198.51.100.1", 40002, 7)
    assert (a.codec.name, a.payload_type, a.telephone_event) == ("G722", 9, 101)
    assert {pt: c.name for pt, c in a.formats.items()} == {9: "G722", 0: "PCMU", 8: "PCMA"}
    assert a.remote == ("192.0.2.5", 17000)
    lines = a.sdp.split("\r\n")
    assert "m=audio 40002 RTP/AVP 9 0 8 101" in lines
    assert "c=IN IP4 198.51.100.1" in lines
    assert {"a=rtpmap:9 G722/8000", "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"} <= set(
        lines
    )
    assert "a=ptime:20" in lines and "a=sendrecv" in lines and a.sends  # voxphone talks back


def test_an_opus_answer_asks_for_no_more_than_the_model_hears() -> None:
    """The answer's Opus parameters are voxphone's own (RFC 7587 §6.1: they say what the
    answerer receives), not the offer's echoed: ``maxplaybackrate`` at the model's 16 kHz."""
    sdp = offer(
        "m=audio 5004 RTP/AVP 107 101",
        "a=rtpmap:107 opus/48000/2",
        "a=fmtp:107 useinbandfec=1;sprop-maxcapturerate=48000;stereo=1",
        "a=rtpmap:101 telephone-event/48000",
        "a=fmtp:101 0-15",
    )
    lines = answer(parse_sdp(sdp), "127.0.0.1", 40000, 1).sdp.split("\r\n")
    assert [line for line in lines if line.startswith("a=fmtp:")] == [
        "a=fmtp:107 maxplaybackrate=16000",
        "a=fmtp:101 0-15",
    ]


def test_a_sendonly_offer_is_answered_recvonly() -> None:
    """RFC 3264 §6.1: the offerer will not receive, so voxphone must not send."""
    a = answer(parse_sdp(offer("m=audio 5004 RTP/AVP 0", "a=sendonly")), "127.0.0.1", 40000, 1)
    assert "a=recvonly" in a.sdp.split("\r\n") and not a.sends


@pytest.mark.parametrize(
    ("m", "attrs", "codec", "pt"),
    [
        ("m=audio 5004 RTP/AVP 107", ["a=rtpmap:107 opus/48000/2"], "opus", 107),
        ("m=audio 5004 RTP/AVP 118", ["a=rtpmap:118 L16/16000"], "L16/16000", 118),
        ("m=audio 5004 RTP/AVP 96 8", ["a=rtpmap:96 speex/8000"], "PCMA", 8),
        ("m=audio 5004 RTP/AVP 0", [], "PCMU", 0),
    ],
)
def test_first_decodable_format_is_chosen(m: str, attrs: list[str], codec: str, pt: int) -> None:
    a = answer(parse_sdp(offer(m, *attrs)), "127.0.0.1", 40000, 1)
    assert (a.codec.name, a.payload_type, a.telephone_event) == (codec, pt, None)


@pytest.mark.parametrize(
    ("m", "events", "codec", "dtmf"),
    [
        ("m=audio 5004 RTP/AVP 111 110", ["a=rtpmap:110 telephone-event/48000"], "opus", 110),
        (
            "m=audio 5004 RTP/AVP 111 101 110",
            ["a=rtpmap:101 telephone-event/8000", "a=rtpmap:110 telephone-event/48000"],
            "opus",
            110,
        ),
        (
            "m=audio 5004 RTP/AVP 0 110 101",
            ["a=rtpmap:110 telephone-event/48000", "a=rtpmap:101 telephone-event/8000"],
            "PCMU",
            101,
        ),
        ("m=audio 5004 RTP/AVP 0 110", ["a=rtpmap:110 telephone-event/48000"], "PCMU", None),
    ],
)
def test_telephone_event_is_paired_at_the_chosen_codecs_clock_rate(
    m: str, events: list[str], codec: str, dtmf: int | None
) -> None:
    """RFC 4733 §2.1: events share the audio's RTP clock (Opus 48000, RFC 7587)."""
    sdp = offer(m, "a=rtpmap:111 opus/48000/2", *events)
    a = answer(parse_sdp(sdp), "127.0.0.1", 40000, 1)
    assert (a.codec.name, a.telephone_event) == (codec, dtmf)
    media = next(line for line in a.sdp.split("\r\n") if line.startswith("m="))
    assert media.split()[3:] == [str(a.payload_type)] + ([str(dtmf)] if dtmf else [])


@pytest.mark.parametrize(
    ("sdp", "message"),
    [
        ("hello", "SDP must start with 'v=0'"),
        ("v=0\r\nnonsense\r\n", "SDP line 2: expected '<type>=<value>'"),
        (offer("m=audio x RTP/AVP 0"), "SDP line 6: malformed m= line"),
        (offer("m=audio ² RTP/AVP 0"), "SDP line 6: malformed m= line"),  # isdigit() but not int()
        (offer("m=audio 5004 RTP/AVP 0", c="c=IN IP9 x"), "SDP line 4: malformed c= line"),
        (offer("m=audio 5004 RTP/AVP 96", "a=rtpmap:x y"), "SDP line 7: malformed a=rtpmap"),
        (offer("m=video 5006 RTP/AVP 96"), "no audio stream \\(media: video\\)"),
        ("v=0\r\no=- 1 1 IN IP4 x\r\ns=-\r\nt=0 0\r\n", "no audio stream \\(media: none\\)"),
        (offer("m=audio 0 RTP/AVP 0"), "all disabled \\(port 0\\)"),
        (offer("m=audio 5004 RTP/SAVP 0"), "RTP/SAVP is not plain RTP"),
        (offer("m=audio 5004 RTP/AVP 0", "a=recvonly"), "offer is recvonly"),
        (offer("m=audio 5004 RTP/AVP 96 97", "a=rtpmap:96 speex/8000", "a=rtpmap:97 AMR/8000"),
         "no codec voxphone decodes \\(offered: speex/8000, AMR/8000\\)"),
        ("v=0\r\n" + "a=x\r\n" * 5000, "the limit is 16384"),
    ],
)  # fmt: skip
def test_bad_offers_are_refused_precisely(sdp: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        answer(parse_sdp(sdp), "127.0.0.1", 40000, 1)


@given(st.text(max_size=300))
def test_any_text_is_answered_or_refused_precisely(text: str) -> None:
    try:
        a = answer(parse_sdp("v=0\n" + text), "127.0.0.1", 40000, 1)
    except TransportError as exc:
        assert str(exc).startswith("SDP")
    else:
        assert a.sdp.startswith("v=0\r\n")
