from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.speech.text import SegmenterConfig, SpeechSegmenter, clean_for_speech, reads_finished


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
        "Snacks, e.g. apples and pears.",
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


def released_at(words: list[str], config: SegmenterConfig | None = None) -> list[list[str]]:
    """What each push releases, pushing ``words`` one at a time (as an endpoint streams)."""
    seg = SpeechSegmenter(config)
    return [seg.push(w) for w in words] + [seg.flush()]


def test_eager_first_clause_is_released_with_the_word_after_its_comma():
    words = ["Your", " order", " shipped", " today,", " and", " it", " should", " arrive", "."]
    # "Your order shipped today," is 25 characters: out as soon as the next word shows
    # the comma ends a clause, before the first_words (7) fallback.
    assert released_at(words) == [
        [], [], [], [], ["Your order shipped today,"], [], [], [], [], ["and it should arrive."]
    ]  # fmt: skip


def test_a_first_clause_from_eager_chars_is_released_with_the_next_word():
    words = ["Good", " morning,", " thanks", " for", " calling."]
    # "Good morning," is 13 characters (eager_chars 12): out with the next word.
    assert released_at(words) == [[], [], ["Good morning,"], [], [], ["thanks for calling."]]


def test_a_first_clause_under_eager_chars_waits_for_the_word_count():
    words = ["Oh", " well,", " my", " order", " shipped", " and", " it", " should", " arrive",
             " soon."]  # fmt: skip
    # "Oh well," is 8 characters: not eager; out once the 7th word is whole (the next one
    # shows it ended), cut at its clause mark.
    assert released_at(words) == [
        [], [], [], [], [], [], [], ["Oh well,"], [], [], ["my order shipped and it should arrive soon."]
    ]  # fmt: skip


def test_short_first_clause_is_not_released_alone():
    assert segments("Sure, I can help with that.")[0] == "Sure, I can help with that."


def test_later_segments_are_batched_to_min_length():
    out = segments("Okay. Yes. No. Maybe. That is all I have to say about it. Really, truly, yes.")
    assert out == ["Okay.", "Yes. No. Maybe. That is all I have to say about it.",
                   "Really, truly, yes."]  # fmt: skip


def test_second_segment_may_end_at_a_clause_later_ones_only_at_sentence_ends():
    out = segments(
        "Okay. The second segment is long enough here, so it ends right at its comma. "
        "The third one, though, goes on to the end of its sentence."
    )
    assert out == [
        "Okay.",
        "The second segment is long enough here,",
        "so it ends right at its comma.",
        "The third one, though, goes on to the end of its sentence.",
    ]


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
    assert segments(text) == ["Your total is $29.99,", "due 3/4 at 7:30."]
    spelled = SpeechSegmenter(normaliser=lambda s: s.replace("7:30", "seven thirty"))
    assert spelled.push(text) + spelled.flush() == [
        "Your total is $29.99,",
        "due 3/4 at seven thirty.",
    ]


def streamed(text: str, step: int, config: SegmenterConfig | None = None) -> list[tuple[int, str]]:
    """Push ``text`` ``step`` characters at a time: (characters pushed when released, segment)."""
    seg = SpeechSegmenter(config)
    out: list[tuple[int, str]] = []
    for at in range(0, len(text), step):
        out += [(min(at + step, len(text)), s) for s in seg.push(text[at : at + step])]
    return out + [(len(text), s) for s in seg.flush()]


def test_cjk_sentences_are_released_as_they_stream_in():
    text = "您好！我可以帮您查询订单。请告诉我订单号。"
    assert streamed(text, 3) == [
        (6, "您好！"),
        (15, "我可以帮您查询订单。"),
        (21, "请告诉我订单号。"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Japanese full stop, exclamation and question marks.
        (
            "こんにちは。ご注文を確認しました！お届けは明日です？",
            ["こんにちは。", "ご注文を確認しました！", "お届けは明日です？"],
        ),
        # The Devanagari danda and double danda.
        (
            "नमस्ते। आपका ऑर्डर आज शाम तक भेज दिया जाएगा। धन्यवाद॥",
            ["नमस्ते।", "आपका ऑर्डर आज शाम तक भेज दिया जाएगा।", "धन्यवाद॥"],
        ),
        # The Arabic question mark.
        (
            "مرحبا؟ كيف يمكنني مساعدتك اليوم في طلبك؟ شكرا.",
            ["مرحبا؟", "كيف يمكنني مساعدتك اليوم في طلبك؟", "شكرا."],
        ),
        # The Urdu full stop, the Armenian full stop, the Ethiopic full stop.
        (
            "شکریہ۔ آپ کا آرڈر کل صبح تک پہنچ جائے گا۔",
            ["شکریہ۔", "آپ کا آرڈر کل صبح تک پہنچ جائے گا۔"],
        ),
        (
            "Բարեւ։ Ձեր պատվերը ճանապարհին է վաղը կհասնի։",
            ["Բարեւ։", "Ձեր պատվերը ճանապարհին է վաղը կհասնի։"],
        ),
        ("ሰላም። ትዕዛዝዎ ነገ ጠዋት ይደርሳል እናመሰግናለን።", ["ሰላም።", "ትዕዛዝዎ ነገ ጠዋት ይደርሳል እናመሰግናለን።"]),
        # The Greek question mark.
        (
            "Γεια σας\u037e Πώς μπορώ να σας βοηθήσω σήμερα\u037e",
            ["Γεια σας\u037e", "Πώς μπορώ να σας βοηθήσω σήμερα\u037e"],
        ),
    ],
)
def test_sentence_ends_in_other_scripts(text: str, expected: list[str]):
    assert segments(text) == expected
    assert [s for _, s in streamed(text, 2)] == expected


def test_first_segment_ends_at_a_cjk_or_arabic_comma_once_long_enough():
    assert (
        segments("好的，我现在就帮您查询一下您的订单状态，请稍等片刻。")[0]
        == "好的，我现在就帮您查询一下您的订单状态，"
    )
    arabic = "حسنا، سأبحث الآن عن حالة طلبك، انتظر قليلا من فضلك."
    assert segments(arabic)[0] == "حسنا، سأبحث الآن عن حالة طلبك،"


def test_a_long_sentence_in_a_spaceless_script_is_not_cut_before_its_end():
    sentence = "我可以帮您查询订单" * 7 + "。"  # 64 characters, no spaces, no clause mark
    text = "好的。" + sentence + "请稍等。"
    assert segments(text) == ["好的。", sentence, "请稍等。"]


def test_html_tags_removed_entities_decoded_before_segmenting():
    text = "Choose <b>Privacy</b> &amp; security.<br>Then tap Save."
    assert segments(text) == ["Choose Privacy & security.", "Then tap Save."]
    # The line break releases the first sentence at once; the entity's ";" is no clause end.
    assert streamed(text, 3) == [(42, "Choose Privacy & security."), (55, "Then tap Save.")]
    assert clean_for_speech(text) == "Choose Privacy & security. Then tap Save."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<p>First paragraph here.</p><p>Second one.</p>",
            ["First paragraph here.", "Second one."],
        ),
        (
            "Steps:<ul><li>Open the app</li><li>Tap <em>Settings</em></li></ul>",
            ["Steps:", "Open the app", "Tap Settings"],
        ),
        (
            "Price &lt; &#36;5 &#x2014; really&nbsp;cheap &eacute;t&eacute;.",
            ["Price < $5 —", "really cheap été."],
        ),
        (
            'Visit <a href="https://e.com/?a=1&amp;b=2">our site</a> today.',
            ["Visit our site today."],
        ),
        ("If x < 5 then AT&T wins.", ["If x < 5 then AT&T wins."]),
        ("Type <filename> here.", ["Type <filename> here."]),
    ],
)
def test_html_variations(text: str, expected: list[str]):
    assert segments(text) == expected
    for step in (1, 2, 5):
        assert [s for _, s in streamed(text, step)] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Great job 👍🏽!", "Great job!"),
        ("Press 1️⃣ or #️⃣ now.", "Press or now."),
        ("Go team 🏴󠁧󠁢󠁳󠁣󠁴󠁿 and 🇫🇷 fans!", "Go team and fans!"),
        ("The family 👨‍👩‍👧‍👦 and the cook 👩🏾‍🍳 are here.", "The family and the cook are here."),
        ("Love it ❤️ ✨ 🙂 .", "Love it."),
        ("A stray tone 🏽 and joiner \u200d here.", "A stray tone and joiner here."),
        ("It is 25°C outside, room № 5.", "It is 25°C outside, room № 5."),
    ],
)
def test_whole_emoji_sequences_disappear(text: str, expected: str):
    assert clean_for_speech(text) == expected
    assert " ".join(segments(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "We sell apples etc. The store opens at nine.",
            ["We sell apples etc.", "The store opens at nine."],
        ),
        (
            "I moved to the U.S. Then I found a job there.",
            ["I moved to the U.S.", "Then I found a job there."],
        ),
        ("Ask for Dr. Who at the desk. Thanks.", ["Ask for Dr. Who at the desk.", "Thanks."]),
        ("See No. 5 on the list. It has it all.", ["See No. 5 on the list.", "It has it all."]),
        ("The answer is no. Then we stop here.", ["The answer is no.", "Then we stop here."]),
        ("Come at 9 a.m. tomorrow please.", ["Come at 9 a.m. tomorrow please."]),
        ("Come at 9 a.m. The doors open then.", ["Come at 9 a.m.", "The doors open then."]),
        ("Books by J. K. Rowling sell well.", ["Books by J. K. Rowling sell well."]),
        ("Apples vs. Oranges is the debate.", ["Apples vs. Oranges is the debate."]),
    ],
)
def test_abbreviations_are_decided_by_what_follows(text: str, expected: list[str]):
    assert segments(text) == expected


def test_first_segment_at_a_word_boundary_when_no_mark_comes_soon():
    text = "Hi World, welcome to our little corner of the world where everything is possible."
    released = streamed(text, 4)
    # The first clause is short (under eager_chars), so it waits for a few more words (the
    # 7th is whole at the space after "corner", in the 10th push of 4 characters), then
    # goes alone.
    assert released[0] == (40, "Hi World,")
    no_marks = "So the best way to get there from the station is by the number nine bus."
    # No mark at all: a word boundary that leaves no dangling article or preposition.
    assert segments(no_marks)[0] == "So the best way to get there"
    assert segments(no_marks, config=SegmenterConfig(first_words=0)) == [no_marks]


def test_first_segment_after_a_delay_when_times_are_given():
    seg = SpeechSegmenter(SegmenterConfig(first_words=0, first_after_ms=200))
    assert seg.push("Well the thing", now_ms=1000.0) == []
    assert seg.push(" is that", now_ms=1150.0) == []
    # 200 ms after the first text: the best boundary so far (not after "is").
    assert seg.poll(1200.0) == ["Well the thing"]
    assert seg.push(" we could go", now_ms=1300.0) == []
    assert seg.flush() == ["is that we could go"]


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("Hello world!", True),
        ("Hello World...", False),
        ("Hello world…", False),
        ("Is it ready?", True),
        ('He said "yes."', True),
        ("您好。", True),
        ("नमस्ते।", True),
        ("and then", False),
        ("", False),
    ],
)
def test_reads_finished(text: str, finished: bool):
    assert reads_finished(text) is finished


SCRIPTS = st.lists(
    st.sampled_from(
        ["您好！", "订单，", "号。", "नमस्ते।", "क्या", "مرحبا؟", "نعم،", "<b>", "</b>", "<br>", "&amp;",
         "&#8212;", "👍🏽", "1️⃣", "🇫🇷", "Dr.", "etc.", "The", "go", "U.S.", "3.5", "yes.", "Why?", "\n"]
    ),
    min_size=1,
    max_size=30,
).map(" ".join)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(SCRIPTS, st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_any_split_of_mixed_scripts_and_markup_gives_the_same_segments(text: str, cuts: list[int]):
    whole = segments(text)
    assert segments(text, [c for c in cuts if c <= len(text)]) == whole
    assert " ".join(whole).split() == clean_for_speech(text).split()
