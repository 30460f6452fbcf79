"""Sphinx's live text: append-only deltas from a hypothesis that revises itself."""

from __future__ import annotations

from voxphone.engines.sphinx import stable_delta


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
