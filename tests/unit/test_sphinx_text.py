"""Sphinx's live text: append-only deltas from a hypothesis that revises itself; its stream's
frames in order whichever way they are handed over."""

from __future__ import annotations

import asyncio

import numpy as np

from voxphone.engines.sphinx import SphinxStream, stable_delta


def deltas(hypotheses: list[str]) -> list[str]:
    out, sent = [], 0
    for hyp in hypotheses:
        text, sent = stable_delta(sent, hyp)
        if text:
            out.append(text)
    return out


def test_stable_words_go_out_once_and_the_moving_last_word_waits() -> None:
    assert deltas(["hello", "hello i", "hello i would", "hello i would like"]) == [
        "hello", " i", " would"
    ]  # fmt: skip


def test_live_text_keeps_flowing_after_a_revision_of_words_already_sent() -> None:
    revised = ["hello i would", "hello eye would like to", "hello eye would like to check the"]
    assert deltas(["hello", "hello i", *revised]) == ["hello", " i", " would like", " to check"]


def test_a_hypothesis_that_shrinks_sends_nothing_until_it_grows_past_what_was_sent() -> None:
    shrunk = ["a b c d", "ab c d", "ab c d e", "ab c d e f"]
    assert deltas(shrunk) == ["a b c", " e"]


async def test_a_frame_taken_at_once_never_takes_the_room_a_waiting_send_was_woken_for() -> None:
    stream = SphinxStream(None, "s", max_queued_frames=2)  # type: ignore[arg-type]  # (no worker: no pump)
    frames = [np.full(1280, i, np.int16) for i in range(5)]
    assert stream.send_nowait(frames[1]) and stream.send_nowait(frames[2])
    assert not stream.send_nowait(frames[3])  # full: ``send`` would wait
    waiting = asyncio.create_task(stream.send(frames[3]))
    await asyncio.sleep(0)
    stream._frames.get_nowait()  # the worker's pump takes a frame: room for the waiting send
    assert not stream.send_nowait(frames[4])  # that room is the waiting send's
    await waiting
    queued = [stream._frames.get_nowait() for _ in range(2)]
    assert queued == [frames[2].tobytes(), frames[3].tobytes()]
