"""The WebRTC signaling checks and rewrites, on a real Chromium offer (tests/data)."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.audio import opus
from voxphone.audio.codecs import G722, OPUS, PCMA, PCMU
from voxphone.errors import DecodeError, TransportError
from voxphone.transports.webrtc_sdp import (
    MAX_OFFER_BYTES,
    Unsupported,
    announce_public_ip,
    answer_dtls_passive,
    answer_opus_fmtp,
    ice_credentials,
    parse_sdpfrag,
    plan_offer,
)
from voxphone.whip_client import to_mono

CHROME = (Path(__file__).parent.parent / "data" / "chrome_offer.sdp").read_text()


def test_chromium_offer_is_answered_with_opus_and_its_data_channel() -> None:
    plan = plan_offer(CHROME)
    assert plan.codec is OPUS
    assert plan.mime_type == "audio/opus"
    assert plan.kinds == ["audio", "application"]


def test_the_offers_first_decodable_codec_wins() -> None:
    offer = CHROME.replace("111 63 9 0 8 13 110 126", "63 13 8 0 111")
    assert plan_offer(offer).codec is PCMA
    offer = CHROME.replace("111 63 9 0 8 13 110 126", "0 126")
    assert plan_offer(offer).codec is PCMU


def test_without_libopus_the_offers_next_codec_is_chosen() -> None:
    """Where libopus cannot be loaded, every Opus packet would be undecodable: a browser offers
    G.722, PCMU and PCMA too, and the answer takes the first of those it lists."""
    assert plan_offer(CHROME, opus=False).codec is G722  # Chrome: 111 (opus) 63 (red) 9 (G.722) 0 …
    offer = CHROME.replace("111 63 9 0 8 13 110 126", "111 126")
    with pytest.raises(Unsupported, match=r"takes PCMU, PCMA or G722 \(libopus is missing\)"):
        plan_offer(offer, opus=False)


def test_libopus_is_available_here_and_missing_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert opus.available()

    def missing() -> None:
        raise DecodeError("libopus not found next to PyAV or on the system; reinstall PyAV")

    monkeypatch.setattr(opus, "_lib", missing)
    assert not opus.available()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.replace("m=audio 9", "m=video 9"),
            "no audio m= line (media: video, application)",
        ),
        (lambda s: s.replace("111 63 9 0 8 13 110 126", "63 13 126"), "no common audio codec"),
        (lambda s: s.replace("a=sendonly", "a=recvonly"), "audio is recvonly"),
        (lambda s: s.replace("m=audio 9", "m=audio 0"), "disabled (port 0)"),
        (lambda s: s.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP"), "not WebRTC's"),
    ],
)
def test_offers_voxphone_cannot_serve_are_unsupported_with_the_reason(edit, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Unsupported, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_offer(edit(CHROME))


def test_malformed_and_huge_offers_are_transport_errors_not_unsupported() -> None:
    for bad in ("", "hello", "v=0\r\nm=audio\r\n", "v=0\r\n" + "a=x\r\n" * (MAX_OFFER_BYTES // 4)):
        with pytest.raises(TransportError) as info:
            plan_offer(bad)
        assert not isinstance(info.value, Unsupported), bad[:40]


def test_sdpfrag_candidates_carry_their_mid_and_end_of_candidates() -> None:
    frag = (
        "a=ice-ufrag:VvtT\r\na=ice-pwd:HgyvBuxHUNCP9fX4RUYtTz/g\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.10 54321 typ host generation 0\r\n"
        "a=candidate:2 1 udp 1686052607 198.51.100.7 40000 typ srflx raddr 192.0.2.10 rport 54321\r\n"
        "a=end-of-candidates\r\n"
    )
    candidates, end = parse_sdpfrag(frag)
    assert [c.mid for c in candidates] == ["0", "0"]
    assert candidates[1].candidate.startswith("2 1 udp 1686052607 198.51.100.7 40000 typ srflx")
    assert end
    assert ice_credentials(frag) == ("VvtT", "HgyvBuxHUNCP9fX4RUYtTz/g")


@pytest.mark.parametrize("frag", ["hello", "a=candidate:1 1 udp\r\n", "c=IN IP4 1.2.3.4\r\n"])
def test_bad_sdpfrags_are_refused_by_line(frag: str) -> None:
    with pytest.raises(TransportError, match="sdpfrag line 1"):
        parse_sdpfrag(frag)


@given(st.text(max_size=300))
def test_sdpfrag_parser_only_ever_raises_transport_error(text: str) -> None:
    try:
        candidates, _ = parse_sdpfrag(text)
    except TransportError as exc:
        assert str(exc).startswith("sdpfrag line ")
    else:
        assert all(len(c.candidate.split()) >= 8 for c in candidates)


def test_public_ip_is_announced_beside_each_ipv4_host_candidate() -> None:
    sdp = (
        "m=audio 50000 UDP/TLS/RTP/SAVPF 96\r\n"
        "a=candidate:abc 1 udp 2130706431 10.0.0.5 50000 typ host\r\n"
        "a=candidate:def 1 udp 2130706431 fd00::5 50001 typ host\r\n"
        "a=candidate:ghi 1 udp 1694498815 198.51.100.9 61000 typ srflx raddr 10.0.0.5 rport 50000\r\n"
        "a=end-of-candidates\r\n"
    )
    out = announce_public_ip(sdp, "203.0.113.7").split("\r\n")
    assert out[1:3] == [
        "a=candidate:abc 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=candidate:abcn 1 udp 2130706431 203.0.113.7 50000 typ host",
    ]
    assert sum("203.0.113.7" in line for line in out) == 1  # not for IPv6 or srflx


def _frame(samples: np.ndarray, layout: str, rate: int, pts: int, time_base: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, time_base)
    return frame


def test_the_whip_client_downmixes_stereo_frames_to_the_mean_of_both_channels() -> None:
    left = np.array([1000, -2000, 30000, 7], np.int16)
    right = np.array([3000, -4000, 30000, -7], np.int16)
    packed = np.stack([left, right], axis=1).reshape(1, -1)  # aiortc's s16 interleaved
    mono = to_mono(_frame(packed, "stereo", 48000, 0, 48000))
    assert mono.tolist() == [2000, -3000, 30000, 0]
    planar = av.AudioFrame.from_ndarray(np.stack([left, right]), format="s16p", layout="stereo")
    assert to_mono(planar).tolist() == [2000, -3000, 30000, 0]
    one = np.array([[5, -5, 9]], np.int16)
    assert to_mono(_frame(one, "mono", 8000, 0, 8000)).tolist() == [5, -5, 9]


def test_an_actpass_offer_is_answered_passive_so_voxphone_is_the_dtls_server() -> None:
    """GStreamer's webrtcbin has an RSA certificate: as its DTLS client, aiortc (ECDSA suites
    only) gets 'no shared cipher'; as the server it works with every client (issue 14.9)."""
    answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=setup:active\r\na=mid:0\r\n"
    assert "a=setup:passive\r\n" in answer_dtls_passive(CHROME, answer)
    assert "a=setup:active" not in answer_dtls_passive(CHROME, answer)
    for chosen in ("active", "passive"):  # the offerer chose: the answer keeps aiortc's role
        offer = CHROME.replace("a=setup:actpass", f"a=setup:{chosen}")
        assert answer_dtls_passive(offer, answer) == answer


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000"],
         ["a=rtpmap:111 opus/48000/2", "a=fmtp:111 maxplaybackrate=16000", "a=rtpmap:0 PCMU/8000"]),
        (["a=rtpmap:96 OPUS/48000/2", "a=fmtp:96 minptime=10; MaxPlaybackRate=48000;useinbandfec=1"],
         ["a=rtpmap:96 OPUS/48000/2", "a=fmtp:96 minptime=10;useinbandfec=1;maxplaybackrate=16000"]),
        (["a=rtpmap:0 PCMU/8000", "a=fmtp:0 x=1"], ["a=rtpmap:0 PCMU/8000", "a=fmtp:0 x=1"]),
        (["a=fmtp:111 useinbandfec=1", "a=rtpmap:111 opus/48000/2"],  # fmtp first
         ["a=fmtp:111 useinbandfec=1;maxplaybackrate=16000", "a=rtpmap:111 opus/48000/2"]),
        (["a=rtpmap:111 opus/48000/2", "a=fmtp:111"],  # no parameters
         ["a=rtpmap:111 opus/48000/2", "a=fmtp:111 maxplaybackrate=16000"]),
        (["a=rtpmap:11 PCMU/8000", "a=fmtp:11 x=1", "a=rtpmap:111 opus/48000/2",
          "a=rtpmap:96 opus/48000/2"],  # 11 is not 111; two Opus payload types
         ["a=rtpmap:11 PCMU/8000", "a=fmtp:11 x=1", "a=rtpmap:111 opus/48000/2",
          "a=fmtp:111 maxplaybackrate=16000", "a=rtpmap:96 opus/48000/2",
          "a=fmtp:96 maxplaybackrate=16000"]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_the_answers_opus_asks_for_no_more_than_the_model_hears(
    lines: list[str], expected: list[str], eol: str
) -> None:
    """``maxplaybackrate`` (RFC 7587 §6.1) joins the Opus format's own parameters, or has a
    line of its own; another codec's are left alone. Chromium sends wideband SILK for it
    (``tests/e2e/test_browser.py``)."""
    head = ["v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 111 96 0"]
    text = eol.join([*head, *lines, "a=setup:passive", ""])
    assert answer_opus_fmtp(text) == eol.join([*head, *expected, "a=setup:passive", ""])


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_every_bundled_audio_section_gets_the_same_opus_parameters(eol: str) -> None:
    """Two audio sections on one BUNDLE transport share payload type 111 (aiortc answers a
    second audio line inactive, but with its codecs): libwebrtc refuses a bundle whose
    sections give one payload type different parameters. The answer's last line may lack its
    line break."""
    section = ["m=audio 9 UDP/TLS/RTP/SAVPF 111 0", "a=rtpmap:111 opus/48000/2"]
    text = eol.join(["v=0", *section, "a=mid:0", *section, "a=inactive"])
    fmtp = "a=fmtp:111 maxplaybackrate=16000"
    assert answer_opus_fmtp(text) == eol.join(
        ["v=0", *section, fmtp, "a=mid:0", *section, fmtp, "a=inactive"]
    )
    assert answer_opus_fmtp(eol.join(section)) == eol.join([*section, fmtp])


async def test_aiortc_takes_the_server_role_from_the_rewritten_answer() -> None:
    """The answer voxphone's gateway gives a Chromium offer says passive, and aiortc's own
    transport is then the DTLS server (the role comes from ``setLocalDescription``)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=CHROME, type="offer"))
        answer = await pc.createAnswer()
        passive = answer_dtls_passive(CHROME, answer.sdp)
        await pc.setLocalDescription(RTCSessionDescription(sdp=passive, type="answer"))
        assert "a=setup:passive" in pc.localDescription.sdp
        assert pc.getTransceivers()[0].receiver.transport._role == "server"
    finally:
        await pc.close()
