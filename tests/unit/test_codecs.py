"""G.711 decoding through PyAV against the ITU-T G.711 reference expansion."""

from __future__ import annotations

import numpy as np
import pytest

from voxphone.audio.codecs import L16_8K, PCMA, PCMU, Decoder, Encoder, codec_by_name
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
        DecodeError, match="unknown codec 'speex'; known: L16/16000, L16/8000, PCMA, PCMU"
    ):
        codec_by_name("speex")
