"""Payload decoders: G.711 against the ITU-T reference expansion, Opus against libopus."""

from __future__ import annotations

import av
import numpy as np
import pytest

from voxphone.audio import opus
from voxphone.audio.codecs import (
    G722,
    L16_8K,
    OPUS,
    PCMA,
    PCMU,
    Codec,
    Decoder,
    Encoder,
    codec_by_name,
)
from voxphone.audio.opus import OpusDecoder
from voxphone.audio.pipeline import AudioPipeline
from voxphone.errors import DecodeError


def ulaw_reference(byte: int) -> int:
    """G.711 µ-law expansion, as in the ITU-T reference (and Sun's g711.c)."""
    u = ~byte & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return (0x84 - t) if u & 0x80 else (t - 0x84)


def alaw_reference(byte: int) -> int:
    """G.711 A-law expansion."""
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


@pytest.mark.parametrize(("codec", "reference"), [(PCMU, ulaw_reference), (PCMA, alaw_reference)])
def test_all_256_code_words_match_the_reference(codec, reference) -> None:  # type: ignore[no-untyped-def]
    pcm = Decoder(codec).decode(bytes(range(256)))
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [reference(b) for b in range(256)]


def test_known_vectors() -> None:
    """Fixed points every G.711 implementation agrees on."""
    assert Decoder(PCMU).decode(b"\xff\x7f\x00\x80").tolist() == [0, 0, -32124, 32124]
    assert Decoder(PCMA).decode(b"\xd5\x55\x2a\xaa").tolist() == [8, -8, -32256, 32256]


def test_l16_is_network_byte_order() -> None:
    assert Decoder(L16_8K).decode(b"\x01\x02\xff\xfe").tolist() == [0x0102, -2]


def test_encode_decode_round_trip_is_close() -> None:
    tone = (np.sin(np.arange(800) / 5) * 8000).astype(np.int16)
    back = Decoder(PCMU).decode(Encoder(PCMU).encode(tone))
    assert np.max(np.abs(back.astype(int) - tone)) < 8000 * 0.04


def test_empty_payload_gives_no_samples() -> None:
    assert Decoder(PCMU).decode(b"").size == 0


def test_unknown_codec_name_lists_the_known_ones() -> None:
    with pytest.raises(
        DecodeError,
        match="unknown codec 'speex'; known: G722, L16/16000, L16/8000, PCMA, PCMU, SLIN/12000,",
    ):
        codec_by_name("speex")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(float) ** 2)))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(float)))
    return float(np.argmax(spectrum) * rate / x.size)


def tone(n: int, rate: int) -> np.ndarray:
    return (np.sin(2 * np.pi * 440 * np.arange(n) / rate) * 8000).astype(np.int16)


def test_g722_decodes_16khz_audio() -> None:
    """G.722 carries 16 kHz audio in 8 kHz-clocked packets: 160 bytes = 20 ms = 320 samples."""
    src = tone(3200, 16000)
    payload = Encoder(G722).encode(src)
    assert len(payload) == 1600
    out = Decoder(G722).decode(payload)
    assert out.size == 3200
    assert peak_hz(out[400:], 16000) == pytest.approx(440, abs=10)
    assert 0.7 < rms(out[400:]) / rms(src[400:]) < 1.3


def opus_packets(layout: str, n: int = 25, bit_rate: int | None = 32000) -> list[bytes]:
    """``n`` 20 ms libopus packets of a 440 Hz tone, coded as ``layout`` at ``bit_rate``
    (None: FFmpeg's default for the layout)."""
    enc = av.CodecContext.create("libopus", "w")
    assert isinstance(enc, av.AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = 48000, layout, "s16"
    if bit_rate:
        enc.bit_rate = bit_rate
    channels = 2 if layout == "stereo" else 1
    src = tone(960 * n, 48000)
    packets: list[bytes] = []
    for i in range(n):
        chunk = np.repeat(src[i * 960 : (i + 1) * 960], channels).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        frame.sample_rate, frame.pts = 48000, i * 960
        packets += [bytes(p) for p in enc.encode(frame)]
    return packets


def test_opus_decodes_to_mono_48k_whatever_it_signals() -> None:
    src = tone(960 * 10, 48000)
    packets = opus_packets("stereo", n=10, bit_rate=None)
    dec = Decoder(OPUS)
    out = np.concatenate([dec.decode(p) for p in packets])
    assert out.size == 960 * len(packets)
    # The tone survives, downmixed to one channel.
    assert peak_hz(out[-4800:], 48000) == pytest.approx(440, abs=10)
    assert 0.7 < rms(out[-4800:]) / rms(src[-4800:]) < 1.3


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_opus_is_libopus_bit_for_bit(layout: str) -> None:
    """voxphone calls libopus itself; FFmpeg's libopus wrapper (PyAV's ``libopus`` decoder,
    int16 at 48 kHz) runs the same library, so the samples must be identical."""
    packets = opus_packets(layout)
    ref = av.CodecContext.create("libopus", "r")
    assert isinstance(ref, av.AudioCodecContext)
    ref.sample_rate, ref.layout = 48000, "mono"
    expected = np.concatenate(
        [f.to_ndarray().reshape(-1) for p in packets for f in ref.decode(av.Packet(p))]
    )
    dec = Decoder(OPUS)
    out = np.concatenate([dec.decode(p) for p in packets])
    assert out.dtype == np.int16
    assert np.array_equal(out, expected)


def test_opus_decodes_at_a_lower_rate_band_limited() -> None:
    """libopus decodes straight to 16 kHz (the model's rate): a third of the samples, the tone
    intact."""
    dec = OpusDecoder(16000)
    out = np.concatenate([dec.decode(p) for p in opus_packets("mono")])
    assert out.size == 320 * 25
    assert peak_hz(out[-3200:], 16000) == pytest.approx(440, abs=10)
    with pytest.raises(DecodeError, match="44100"):
        OpusDecoder(44100)


def test_an_empty_opus_payload_is_no_audio_not_a_concealed_loss() -> None:
    """libopus takes a zero-length packet for a lost one and conceals 120 ms; a payload that
    is empty carries nothing, so it decodes to nothing."""
    assert OpusDecoder(16000).decode(b"").size == 0


def test_without_libopus_only_opus_payloads_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """libopus is loaded at an Opus call's first payload: where it cannot be (PyAV built
    against an FFmpeg without it), an Opus call still opens, other codecs work, and each Opus
    payload is a ``DecodeError`` naming the fix (the call counts it)."""

    def missing() -> None:
        raise DecodeError("libopus not found next to PyAV or on the system; reinstall PyAV")

    monkeypatch.setattr(opus, "_lib", missing)
    AudioPipeline(OPUS)
    assert Decoder(PCMU).decode(bytes(160)).size == 160
    with pytest.raises(DecodeError, match="libopus not found"):
        Decoder(OPUS).decode(opus_packets("mono", n=1)[0])


@pytest.mark.parametrize("payload", [b"\x03", b"\xff\xff\xff", bytes(1500)])
def test_a_corrupt_opus_payload_is_a_decode_error_and_the_stream_goes_on(payload: bytes) -> None:
    dec = Decoder(OPUS)
    good = opus_packets("mono", n=2)
    assert dec.decode(good[0]).size == 960
    with pytest.raises(DecodeError, match=rf"^opus: cannot decode {len(payload)}-byte payload: "):
        dec.decode(payload)
    assert dec.decode(good[1]).size == 960


@pytest.mark.parametrize("codec", [PCMU, PCMA], ids=lambda c: c.name)
def test_g711_table_encoder_is_ffmpegs_encoder(codec: Codec) -> None:
    """Every int16 value, sent 20 ms at a time, encodes to the byte FFmpeg's own encoder gives
    when it encodes them all at once (the table is indexed by the sample's bits)."""
    every = np.arange(-32768, 32768, dtype=np.int16)
    ctx = av.CodecContext.create(codec.ffmpeg_name, "w")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate, ctx.layout, ctx.format = codec.sample_rate, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(every.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = codec.sample_rate
    ffmpeg = b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])
    ours = b"".join(Encoder(codec).encode(every[i : i + 160]) for i in range(0, every.size, 160))
    assert ours == ffmpeg
