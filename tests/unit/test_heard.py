"""What the listener heard of a reply cut part-way (``heard_prefix`` over a ``SpokenLog``)."""

from __future__ import annotations

from runtime.conversation.history import FAST_MS_PER_CHAR, SpokenLog, heard_prefix

RATE = 24000
SUNNY = "It's sunny and mild in Paris today,"  # 7 words, 35 characters


def test_finished_segments_are_heard_in_proportion_to_their_audio():
    log = SpokenLog()
    log.add("Hello there.", 0, 24000)
    log.add(SUNNY, 24000, 72000)
    assert heard_prefix(log.segments, 0) == ""
    assert heard_prefix(log.segments, 23999) == "Hello"  # 1 of 2 words at 99.99 %
    assert heard_prefix(log.segments, 24000) == "Hello there."
    assert heard_prefix(log.segments, 48000) == "Hello there. It's sunny and"  # half: 3 of 7
    assert heard_prefix(log.segments, 72000) == f"Hello there. {SUNNY}"


def test_a_segment_cut_early_in_its_voice_is_not_heard_whole():
    # A streaming voice had written 0.1 s of a 2 s sentence when it was cut, and all of
    # that played: a tenth of the sentence was heard (none of its 7 words), not all of it.
    log = SpokenLog()
    log.add(SUNNY, 0, 2400, complete=False, sample_rate=RATE)
    [seg] = log.segments
    assert FAST_MS_PER_CHAR == 45.0
    assert seg.full_end == 35 * 45 * RATE // 1000 == 37800
    assert heard_prefix(log.segments, 2400) == ""
    # Half of what its characters take at a fast speaker's rate: 3 of its 7 words.
    log = SpokenLog()
    log.add(SUNNY, 0, 18900, complete=False, sample_rate=RATE)
    assert heard_prefix(log.segments, 18900) == "It's sunny and"


def test_a_segment_cut_late_in_its_voice_keeps_its_written_length():
    # Piper writes the sentence, then a short tail: cut before the tail, the written audio
    # (longer than the fast estimate) is the segment's length.
    log = SpokenLog()
    log.add(SUNNY, 0, 48000, complete=False, sample_rate=RATE)
    assert log.segments[0].full_end == 48000
    assert heard_prefix(log.segments, 24000) == "It's sunny and"
    assert heard_prefix(log.segments, 48000) == SUNNY


def test_a_cut_segment_after_finished_ones_is_measured_from_its_own_start():
    log = SpokenLog()
    log.add("Hello there.", 0, 24000)
    log.add(SUNNY, 24000, 26400, complete=False, sample_rate=RATE)
    assert log.segments[1].full_end == 24000 + 37800
    assert heard_prefix(log.segments, 26400) == "Hello there."
    assert heard_prefix(log.segments, 12000) == "Hello"
