"""Resampler continuity, exact framing, and the timestamp-driven timeline."""

from __future__ import annotations

import av
import numpy as np
import pytest

from voxphone.audio.codecs import L16_16K, OPUS, PCMA, PCMU, SLIN, Codec, Decoder, Encoder
from voxphone.audio.framer import FRAME_SAMPLES, Framer, Placement, Timeline, ts_delta
from voxphone.audio.pipeline import AudioPipeline
from voxphone.audio.resample import Resampler
from voxphone.testing import rtp_packets
from voxphone.transports.rtp_packet import RtpPacket


def chirp(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * (100 + 900 * t) * t) * 12000).astype(np.int16)


def fft_resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """The ideal band-limited resample of a whole signal: its spectrum, padded or cut."""
    n_out = x.size * out_rate // in_rate
    spec = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(n_out // 2 + 1, complex)
    keep = min(spec.size, out.size)
    out[:keep] = spec[:keep]
    return np.fft.irfft(out, n_out) * (n_out / x.size)


def stream(r: Resampler, x: np.ndarray, chunk: int) -> np.ndarray:
    parts = [r.process(x[i : i + chunk]) for i in range(0, x.size, chunk)]
    return np.concatenate([*parts, r.flush()])


@pytest.mark.parametrize("chunk", [160, 80, 333])
def test_chunked_resampling_equals_one_shot(chunk: int) -> None:
    """State carries across chunk joins: no clicks, same samples as resampling in one go."""
    x = chirp(1.0, 8000)
    whole = stream(Resampler(8000, 16000), x, x.size)
    streamed = stream(Resampler(8000, 16000), x, chunk)
    assert streamed.size == whole.size == 16000
    assert np.max(np.abs(streamed.astype(int) - whole.astype(int))) <= 1


@pytest.mark.parametrize(("rate", "packet"), [(8000, 160), (48000, 960), (12000, 240)])
def test_every_packet_releases_its_whole_duration(rate: int, packet: int) -> None:
    """No block latency: after each 20 ms packet, at least 20 ms more has come out (exactly,
    at 8 and 48 kHz), so an 80 ms frame never waits for a later packet. The audio itself is
    delayed only by the lead of silence the stream starts with: at most 2 ms."""
    r = Resampler(rate, 16000)
    assert r.lead <= 32
    x = chirp(1.0, rate)
    out = 0
    for n in range(1, 51):
        out += r.process(x[(n - 1) * packet : n * packet]).size
        assert 0 <= out - n * 320 <= (0 if rate in (8000, 48000) else 1)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_fidelity_against_an_ideal_resample(rate: int) -> None:
    """Streamed in 20 ms packets, telephone-band tones come out with an SNR above 60 dB against
    the ideal band-limited resample (libswresample: ≈ 86 dB; soxr's cubic QQ, the only soxr
    quality without block latency, ≈ 25 dB on speech in ``benchmarks/resample.py``)."""
    t = np.arange(rate) / rate
    x = (sum(np.sin(2 * np.pi * f * t) for f in (300, 1100, 2300, 3100)) * 4000).astype(np.int16)
    r = Resampler(rate, 16000)
    y = stream(r, x, rate // 50)[r.lead :].astype(np.float64)
    ref = fft_resample(x, rate, 16000)[: y.size]
    inner = slice(800, 15000)  # the ends see the stream's start and stop, not its steady state
    err = y[inner] - ref[inner]
    assert 10 * np.log10(np.sum(ref[inner] ** 2) / np.sum(err**2)) > 60


def test_pipeline_frames_leave_on_the_packet_that_completes_them() -> None:
    """Batched per frame, still no added wait: 20 ms PCMU packets give a frame after packets
    4, 8, 12 … — the packet carrying the frame's last input — never one packet later."""
    pipe = AudioPipeline(PCMU)
    enc = Encoder(PCMU)
    x = chirp(1.0, 8000)
    done = [
        n for n in range(1, 51) if pipe.push_packet(n * 160, enc.encode(x[(n - 1) * 160 : n * 160]))
    ]
    assert done == list(range(4, 51, 4))


@pytest.mark.parametrize(
    ("codec", "packet"), [(L16_16K, 320), (SLIN[12000], 240), (SLIN[48000], 960)]
)
def test_frames_leave_on_the_completing_packet_at_every_rate(codec: Codec, packet: int) -> None:
    """The same at other rates, through the cached batch size (``_update_need``): after 20 ms
    packet n, exactly n // 4 frames have left (12 kHz: its ≤ 1-sample rounding aside)."""
    pipe = AudioPipeline(codec)
    x = chirp(2.0, codec.sample_rate)
    out = 0
    for n in range(1, 101):
        out += len(pipe.push_timed_pcm(n * packet, x[(n - 1) * packet : n * packet]))
        assert out == n // 4 or (codec.sample_rate == 12000 and out == (n - 1) // 4)


def test_framer_hands_out_a_fresh_array_itself_and_copies_one_it_does_not_own() -> None:
    """An ``owned`` array of exactly one frame, with nothing buffered, goes out as it is (no
    copies); one the caller keeps (``owned=False``) is copied; framing is the same either way."""
    f = Framer()
    x = np.arange(FRAME_SAMPLES, dtype=np.int16)
    assert f.push(x, owned=True)[0] is x
    (copied,) = f.push(x)
    assert copied is not x and np.array_equal(copied, x)
    y = np.arange(3000, dtype=np.int16)
    owned, plain = Framer(), Framer()
    a = owned.push(y[:100], owned=True) + owned.push(y[100:], owned=True)
    a += owned.push(y.copy(), owned=True)
    b = plain.push(y[:100]) + plain.push(y[100:]) + plain.push(y.copy())
    assert [fr.tolist() for fr in a] == [fr.tolist() for fr in b] and len(a) == 4
    assert owned.frames_out == plain.frames_out == 4 and owned.missing == plain.missing
    last_a, last_b = owned.flush(), plain.flush()
    assert last_a is not None and last_b is not None and np.array_equal(last_a, last_b)


def test_timeline_short_path_agrees_with_the_full_decision() -> None:
    """In-order packets of one size take ``place``'s short path; a size change, a gap, an
    overlap and a clock change right after it are still decided in full."""
    tl = Timeline(8000, 16000)  # G.722: 320 samples per 160 clock units
    assert [tl.place(160 * i, 320) for i in range(5)] == [Placement(0, 0)] * 5
    assert tl.place(800, 160) == Placement(0, 0)  # 10 ms packet: 80 clock units
    assert tl.place(880, 160) == Placement(0, 0) and tl.elapsed_ms == 120
    assert tl.place(1120, 160) == Placement(320, 0)  # 160 units (20 ms) lost
    assert tl.place(1160, 160) == Placement(0, 80)  # overlaps the last by 40 units
    assert tl.place(1120, 160) is None and tl.stats.late == 1
    assert tl.elapsed_ms == 155
    tl.retime(8000, 8000)  # PCMA after G.722: 160 samples are now 160 units, not 80
    assert tl.place(1240, 160) == Placement(0, 0) and tl.place(1400, 160) == Placement(0, 0)
    assert tl.elapsed_ms == 195


@pytest.mark.parametrize("rate", [8000, 48000])
def test_direct_swr_is_bit_exact_with_pyav_audioresampler(rate: int) -> None:
    """``swr_convert`` called directly gives PyAV's ``AudioResampler`` output sample for sample
    (the same library and options), after the lead of silence the stream starts with."""
    x = chirp(0.5, rate)
    ours = stream(Resampler(rate, 16000), x, rate // 50)
    pyav = av.AudioResampler(format="s16", layout="mono", rate=16000)
    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    ref = np.concatenate([f.to_ndarray().reshape(-1) for f in pyav.resample(frame)])
    lead = Resampler(rate, 16000).lead
    n = min(ours.size - lead, ref.size)
    assert n > 0.9 * x.size * 16000 / rate
    assert np.array_equal(ours[lead : lead + n], ref[:n])


@pytest.mark.parametrize("rate", [8000, 16000])
def test_input_written_in_place_resamples_as_process_does(rate: int) -> None:
    """What a decoder writes into ``input(n)`` comes out of ``process_input`` exactly as the
    same samples through ``process``, whatever the batch sizes (the planes grow, and a view
    of an outgrown plane is never handed out), and at equal rates as the samples themselves."""
    x = chirp(2.0, rate)  # more samples than the batches below take
    copied, in_place = Resampler(rate, 16000), Resampler(rate, 16000)
    out_c, out_p, pos = [], [], 0
    for n in [640, 640, 160, 2000, 640, 333, 3000, 640]:
        chunk = x[pos : pos + n]
        pos += n
        out_c.append(copied.process(chunk))
        room = in_place.input(n)
        room[:] = chunk
        out_p.append(in_place.process_input(room))
    assert np.array_equal(np.concatenate(out_p), np.concatenate(out_c))
    assert np.array_equal(in_place.flush(), copied.flush())


def test_a_flushed_resampler_holds_no_context_and_starts_a_new_stream_as_a_new_one() -> None:
    """A call's end (and a codec switch) flushes its resampler: the libswresample context is
    freed then, not replaced by one nobody uses, and a stream fed afterwards (a playout's next
    clip) comes out exactly as from a new resampler."""
    x = chirp(0.5, 8000)
    used = Resampler(8000, 16000)
    assert used.flush().size == 0 and used._swr is None  # never fed: nothing made
    used.process(x[:1000])
    assert used._swr is not None
    used.flush()
    assert used._swr is None
    fresh = Resampler(8000, 16000)
    assert np.array_equal(used.process(x), fresh.process(x))
    assert np.array_equal(used.flush(), fresh.flush())


def test_a_g711_decoder_writes_into_the_array_it_is_given() -> None:
    payload = bytes(range(256))
    room = np.zeros(256, np.int16)
    assert Decoder(PCMU).decode(payload, room) is room
    assert np.array_equal(room, Decoder(PCMU).decode(payload))


def test_equal_rates_pass_through() -> None:
    x = chirp(0.1, 16000)
    assert Resampler(16000, 16000).process(x) is x


def test_framer_cuts_exact_frames_and_pads_the_last() -> None:
    f = Framer()
    frames = f.push(np.arange(3000, dtype=np.int16)) + f.push(np.arange(10, dtype=np.int16))
    assert [fr.size for fr in frames] == [FRAME_SAMPLES, FRAME_SAMPLES]
    assert frames[1][0] == FRAME_SAMPLES
    last = f.flush()
    assert last is not None and last.size == FRAME_SAMPLES
    assert last[: 3010 - 2 * FRAME_SAMPLES].tolist() == [*range(2560, 3000), *range(10)]
    assert not last[450:].any()
    assert f.flush() is None
    assert f.position_ms == 240


@pytest.mark.parametrize(
    ("a", "b", "d"), [(10, 5, 5), (5, 10, -5), (3, 0xFFFFFFF0, 19), (0xFFFFFFF0, 3, -19)]
)
def test_timestamp_delta_is_wrap_aware(a: int, b: int, d: int) -> None:
    assert ts_delta(a, b) == d


def test_timeline_fills_gaps_drops_late_and_duplicates() -> None:
    tl = Timeline(8000, 8000)
    assert tl.place(1000, 160) is not None
    gap = tl.place(1480, 160)  # 2 packets lost
    assert gap is not None and gap.silence == 320
    assert tl.place(1320, 160) is None  # the straggler arrives after its slot was filled
    assert tl.place(1480, 160) is None  # duplicate
    overlap = tl.place(1560, 160)  # half of it was already covered
    assert overlap is not None and (overlap.silence, overlap.skip) == (0, 80)
    assert (tl.stats.late, tl.stats.gap_samples) == (2, 320)


def test_timeline_reanchors_on_huge_jumps_instead_of_stalling() -> None:
    tl = Timeline(8000, 8000, max_gap_s=1.0, max_late_s=1.0)
    tl.place(0, 160)
    jump = tl.place(80_000, 160)  # 10 s ahead: too long to be loss
    assert jump is not None and jump.silence == 0
    after = tl.place(80_160, 160)  # the clock continues from the new origin
    assert after is not None and after.silence == 0
    back = tl.place(10, 160)  # a sender reset far back in time
    assert back is not None and back.silence == 0
    assert tl.stats.discontinuities == 2
    assert tl.stats.late == 0


def test_g722_style_clock_ratio() -> None:
    """Timestamps at 8 kHz for 16 kHz audio: a 20 ms packet is 160 ticks, 320 samples."""
    tl = Timeline(8000, 16000)
    tl.place(0, 320)
    gap = tl.place(320, 320)
    assert gap is not None and gap.silence == 320


def frames_for(packets: list, pipe: AudioPipeline) -> int:  # type: ignore[type-arg]
    n = sum(len(pipe.push_packet(p.timestamp, p.payload)) for p in packets)
    return n + len(pipe.flush())


def test_pipeline_frame_clock_is_exact_under_loss_reorder_duplicates_and_wrap() -> None:
    """Whatever the network does, 2 s of RTP timestamps make 2 s of frames."""
    pcm = chirp(2.0, 8000)
    clean = list(rtp_packets(pcm, PCMU, first_seq=65500, first_ts=0xFFFFF000, seed=1))
    assert len(clean) == 100
    damaged = [p for i, p in enumerate(clean) if i % 10 != 3]  # 10 % loss
    damaged[20], damaged[21] = damaged[21], damaged[20]  # reorder
    damaged.insert(40, damaged[39])  # duplicate
    pipe = AudioPipeline(PCMU)
    assert frames_for(damaged, pipe) == 2000 // 80
    assert pipe.timeline.stats.late == 2  # the duplicate and the reordered straggler
    assert pipe.timeline.stats.discontinuities == 0


def test_pipeline_matches_clean_audio_where_packets_arrived() -> None:
    pcm = chirp(1.0, 8000)
    packets = list(rtp_packets(pcm, PCMU, seed=2))
    ref = AudioPipeline(PCMU)
    ref_out = np.concatenate([f for p in packets for f in ref.push_packet(p.timestamp, p.payload)])
    lossy = AudioPipeline(PCMU)
    out = np.concatenate(
        [
            f
            for i, p in enumerate(packets)
            if i != 20
            for f in lossy.push_packet(p.timestamp, p.payload)
        ]
    )
    assert out.size == ref_out.size
    lost = slice(20 * 320, 21 * 320)
    assert np.abs(out[lost].astype(int)).mean() < np.abs(ref_out[lost].astype(int)).mean() / 4
    before = slice(0, 18 * 320)  # clear of the resampling filter's reach
    assert np.max(np.abs(out[before].astype(int) - ref_out[before].astype(int))) <= 2


def test_encoder_payload_size_matches_ptime() -> None:
    assert len(Encoder(PCMU).encode(np.zeros(160, np.int16))) == 160


def test_timeline_places_events_on_the_call_clock_and_survives_format_changes() -> None:
    """``ms_at``: media time of a timestamp (for key presses); ``retime``: a format with the
    same RTP clock continues the timeline, one with another clock re-anchors it."""
    tl = Timeline(8000, 16000)  # G.722
    for i in range(10):
        assert tl.place(1000 + 160 * i, 320) is not None
    assert tl.elapsed_ms == 200 and tl.ms_at(1000 + 1600 + 800) == 300 and tl.ms_at(1000) == 0
    tl.retime(8000, 8000)  # PCMA: same clock, continues with a 20 ms gap filled
    assert tl.place(1000 + 1760, 160) == Placement(160, 0) and tl.elapsed_ms == 240
    tl.retime(48000, 48000)  # Opus: timestamps not comparable, so the next one anchors
    assert tl.place(7, 960) == Placement(0, 0) and tl.elapsed_ms == 260
    assert tl.stats.late == 0 and tl.stats.discontinuities == 0


@pytest.mark.parametrize("codec", [PCMU, PCMA])
def test_batched_g711_decode_equals_decoding_each_packet(codec: Codec) -> None:
    """G.711 payloads wait undecoded until a frame's worth is there, then decode in one lookup:
    frames and when they leave are exactly those of decoding each packet on arrival, through
    loss (silence), a straggler (late), a duplicate and a packet half over its predecessor."""
    pcm = chirp(1.0, 8000)
    packets = list(rtp_packets(pcm, codec, seed=3))
    damaged = [p for i, p in enumerate(packets) if i not in (7, 20, 21)]
    damaged.insert(12, packets[7])  # arrives after its slot was filled
    damaged.insert(30, damaged[29])
    half = packets[41]  # a packet over the second half of packet 40 and the first of 41
    at = damaged.index(packets[40]) + 1
    damaged.insert(at, RtpPacket(half.payload_type, 0, half.timestamp - 80, 0, half.payload))
    batched, each = AudioPipeline(codec), AudioPipeline(codec)
    decoder = Decoder(codec)
    for p in damaged:
        out_b = batched.push_packet(p.timestamp, p.payload)
        out_e = each.push_timed_pcm(p.timestamp, decoder.decode(p.payload))
        assert len(out_b) == len(out_e)
        for b, e in zip(out_b, out_e, strict=True):
            assert np.array_equal(b, e)
    assert [f.tolist() for f in batched.flush()] == [f.tolist() for f in each.flush()]
    assert batched.timeline.stats == each.timeline.stats
    assert (batched.timeline.stats.late, batched.timeline.stats.gap_samples) == (2, 3 * 160)


def test_opus_is_decoded_at_the_models_rate_and_framed_without_resampling() -> None:
    """An Opus call's packets (48 kHz RTP clock) are decoded straight to 16 kHz by libopus:
    the pipeline's PCM is at 16 kHz, nothing is resampled, a frame leaves on every fourth
    20 ms packet, loss becomes silence on the 48 kHz clock, and the speech band survives."""
    pipe = AudioPipeline(OPUS)
    assert (pipe.rate, pipe.resampler.in_rate, pipe.resampler.fresh) == (16000, 16000, False)
    x = chirp(2.0, 48000)
    packets = [p for i, p in enumerate(rtp_packets(x, OPUS, payload_type=111)) if i != 50]
    frames = [f for p in packets for f in pipe.push_packet(p.timestamp, p.payload)]
    assert len(frames) == 100 // 4 and pipe.timeline.stats.gap_samples == 320
    out = np.concatenate(frames)
    ref = fft_resample(x, 48000, 16000)[: out.size]
    ok = np.r_[0:800, 1800 : out.size]  # away from the coder's start-up and the lost packet
    # Opus is lossy and delays its output by a few ms: compare spectra, not samples.
    a, b = (np.abs(np.fft.rfft(s[ok][:16000])) for s in (out, ref))
    assert np.corrcoef(a, b)[0, 1] > 0.9


@pytest.mark.parametrize("ms", ["2.5", "10", "20", "40", "60", "120"])
def test_opus_of_every_frame_duration_fills_the_clock_exactly(ms: str) -> None:
    """Opus frames last 2.5 to 120 ms (RFC 6716 §2.1.4; senders pick their ptime): each
    packet's 16 kHz samples land on its 48 kHz timestamps with no gap and nothing late, and
    the 80 ms frames follow the audio whatever the packet size."""
    enc = av.CodecContext.create("libopus", "w")
    assert isinstance(enc, av.AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = 48000, "mono", "s16"
    enc.options = {"frame_duration": ms}
    enc.open()
    step = enc.frame_size
    x = chirp(1.0, 48000)
    pipe = AudioPipeline(OPUS)
    frames = packets = 0
    for ts in range(0, x.size - step + 1, step):
        frame = av.AudioFrame.from_ndarray(x[ts : ts + step].reshape(1, -1), "s16", "mono")
        frame.sample_rate, frame.pts = 48000, ts
        for p in enc.encode(frame):
            frames += len(pipe.push_packet(packets * step, bytes(p)))
            packets += 1
    stats = pipe.timeline.stats
    assert (stats.gap_samples, stats.late, stats.discontinuities) == (0, 0, 0)
    assert packets > 5 and pipe.timeline.elapsed_ms == packets * float(ms)
    assert frames == int(packets * float(ms)) // 80


def test_gaps_are_counted_in_ms_across_a_switch_to_opus() -> None:
    """A 40 ms gap in PCMU (8 kHz) and another in Opus (decoded at 16 kHz, on a 48 kHz clock)
    are 80 ms of gap, whatever the rates of the silence inserted."""
    pipe = AudioPipeline(PCMU)
    narrow = list(rtp_packets(chirp(0.2, 8000), PCMU, first_ts=0))
    for p in narrow[:3] + narrow[5:]:  # packets 3 and 4 (40 ms) lost
        pipe.push_packet(p.timestamp, p.payload)
    pipe.switch(OPUS)
    wide = list(rtp_packets(chirp(0.2, 48000), OPUS, payload_type=111, first_ts=0))
    for p in wide[:3] + wide[5:]:
        pipe.push_packet(p.timestamp, p.payload)
    stats = pipe.timeline.stats
    assert stats.gap_ms == 80 and stats.gap_samples == 320 + 640
