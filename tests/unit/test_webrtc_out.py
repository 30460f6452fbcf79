"""The bot's outbound WebRTC track: paced 20 ms frames, silence between talkspurts, a bounded
queue ahead of it, clear; and the endpoint's DTMF message on the data channel."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from voxphone.transports.webrtc_out import MAX_QUEUED_FRAMES, BotAudioTrack, WebRtcEndpoint


def frame(value: int, samples: int = 960) -> np.ndarray:
    return np.full(samples, value, np.int16)


async def test_frames_come_out_in_order_every_20_ms_with_silence_between() -> None:
    track = BotAudioTrack(48000)
    track.push(frame(1))
    track.push(frame(2))
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = [await track.recv() for _ in range(5)]
    elapsed = loop.time() - start
    assert 0.075 <= elapsed < 0.5  # 4 waits of 20 ms after the first frame (a busy CI: slack)
    values = [int(f.to_ndarray()[0, 0]) for f in got]
    assert values == [1, 2, 0, 0, 0]
    assert [f.pts for f in got] == [0, 960, 1920, 2880, 3840]
    assert {(f.sample_rate, f.samples, f.format.name) for f in got} == {(48000, 960, "s16")}
    assert (track.frames_sent, track.silent_frames) == (2, 3)


async def test_the_queue_is_bounded_and_clear_empties_it() -> None:
    track = BotAudioTrack(8000)
    dropped: list[int] = []
    track.on_drop = dropped.append
    for i in range(MAX_QUEUED_FRAMES + 3):
        track.push(frame(i + 1, 160))
    assert sum(dropped) == 3  # the oldest went, counted
    assert int((await track.recv()).to_ndarray()[0, 0]) == 4
    assert track.clear() == MAX_QUEUED_FRAMES - 1
    assert int((await track.recv()).to_ndarray()[0, 0]) == 0


async def test_a_stopped_track_ends_the_sender() -> None:
    track = BotAudioTrack(8000)
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_the_endpoint_sends_dtmf_on_the_data_channel_and_lasts_the_key() -> None:
    sent: list[str] = []
    hung_up: list[str] = []
    endpoint = WebRtcEndpoint(BotAudioTrack(16000), sent.append, hung_up.append)
    assert endpoint.sample_rate == 16000 and endpoint.can_send_dtmf
    loop = asyncio.get_running_loop()
    start = loop.time()
    await endpoint.send_dtmf("5", 60)
    assert loop.time() - start >= 0.055
    assert [json.loads(m) for m in sent] == [{"type": "bot.dtmf", "digit": "5", "duration_ms": 60}]
    endpoint.hangup("hangup")
    assert hung_up == ["hangup"]
