from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.speech.text import SegmenterConfig, SpeechSegmenter, clean_for_speech


def segments(
    text: str, cuts: list[int] | None = None, config: SegmenterConfig | None = None
) -> list[str]:
    seg = SpeechSegmenter(config)
    points = sorted(set(cuts or []))
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    out: list[str] = []
    for piece in pieces:
        out += seg.push(piece)
    return out + seg.flush()


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith will see you now.",
        "It costs $29.99 today.",
        "Version 3.5 is out.",
        "We ship to the U.S. and Canada.",
        "Bring snacks, e.g. apples and pears.",
        "Visit example.com or mail help@example.com for details.",
        "Well... maybe later.",
    ],
)
def test_no_split_inside_abbreviations_numbers_urls(text: str):
    assert segments(text) == [text]


def test_sentences_split_and_first_segment_released_early():
    seg = SpeechSegmenter()
    # The first sentence is released as soon as the next one starts.
    assert seg.push("Hi there! How") == ["Hi there!"]
    assert seg.push(" are you doing today? I am") == []
    assert seg.flush() == ["How are you doing today? I am"]


def test_eager_first_clause_at_a_comma():
    out = segments("Your order shipped this morning, and it should arrive on Thursday afternoon.")
    assert out[0] == "Your order shipped this morning,"


def test_short_first_clause_is_not_released_alone():
    assert segments("Sure, I can help with that.")[0] == "Sure, I can help with that."


def test_later_segments_are_batched_to_min_length():
    out = segments("Okay. Yes. No. Maybe. That is all I have to say about it, really.")
    assert out[0] == "Okay."
    assert out[1] == "Yes. No. Maybe. That is all I have to say about it, really."


def test_numbered_list_and_line_breaks():
    out = segments("Here are the steps:\n1. Open the app.\n2. Tap settings.\n")
    assert out == ["Here are the steps:", "1. Open the app.", "2. Tap settings."]


def test_markdown_code_emoji_and_reasoning_are_not_spoken():
    text = (
        "<think>the user wants code</think># Title\n**Bold** and [a link](https://e.com) 😀!\n"
        "```python\nprint('hi')\n```\nDone."
    )
    assert segments(text) == ["Title", "Bold and a link!", "Done."]


def test_markup_only_gives_nothing():
    assert segments("**  ** \n```\ncode only\n```\n😀") == []


def test_long_run_without_punctuation_is_broken_at_a_space():
    words = " ".join(["word"] * 80)
    out = segments(words, config=SegmenterConfig(max_chars=100))
    assert all(len(s) <= 100 for s in out)
    assert " ".join(out).split() == words.split()


def test_clean_for_speech():
    assert clean_for_speech("  - **Hello**  world 🙂 .") == "Hello world."


def test_config_is_validated():
    with pytest.raises(ValueError, match="positive"):
        SegmenterConfig(eager_chars=0)


TEXT = st.lists(
    st.sampled_from(
        [
            "Hello",
            "there",
            "Dr.",
            "Smith",
            "3.5",
            "$29.99",
            "U.S.",
            "e.g.",
            "and",
            "ok,",
            "wait...",
            "Yes!",
            "why?",
            "no.",
            "It",
            "costs",
            "\n",
            "1.",
            "**bold**",
            "😀",
            "example.com.",
        ]
    ),
    min_size=1,
    max_size=40,
).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(TEXT, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_split_gives_the_same_segments_and_nothing_is_lost(text: str, cuts: list[int]):
    whole = segments(text)
    assert segments(text, [c for c in cuts if c <= len(text)]) == whole
    # Nothing lost or duplicated: the words of the segments are the words of the cleaned text.
    assert " ".join(whole).split() == clean_for_speech(text).split()


def test_numbers_are_left_alone_unless_a_normaliser_is_configured():
    text = "Your total is $29.99, due 3/4 at 7:30."
    assert segments(text) == [text]
    spelled = SpeechSegmenter(normaliser=lambda s: s.replace("7:30", "seven thirty"))
    assert spelled.push(text) + spelled.flush() == [
        "Your total is $29.99, due 3/4 at seven thirty."
    ]
