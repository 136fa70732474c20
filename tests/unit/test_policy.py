"""The turn-taking policy, driven frame by frame with a virtual clock (exact to the frame)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from runtime.conversation.config import TurnDetection
from runtime.conversation.policy import (
    BURST_END_MS,
    CLEAR_WORDS,
    CONFIDENT_END,
    FRAME_MS,
    HOLD_MS,
    MAX_RESUMES,
    PRE_ROLL_MS,
    TRAILING_END,
    UNCLEAR_SHORT_MS,
    BackChannel,
    CheckBurst,
    ContinueTurn,
    Decision,
    EndTurn,
    HoldReply,
    Interrupt,
    Pause,
    Phase,
    ReleaseReply,
    Resume,
    Speculate,
    StartTurn,
    TurnTakingPolicy,
    claims_the_floor_so_far,
    classify,
    is_backchannel,
    reads_complete,
)

MS = 1_000_000


class Driver:
    """Feeds frames at 20 ms steps of a virtual clock and records every decision with its frame."""

    def __init__(
        self, policy: TurnTakingPolicy, hear: Callable[[int, int], str] | None = None
    ) -> None:
        self.policy = policy
        self.hear = hear  # answers each burst check at once: (first_frame, end_frame) -> text
        self.confidence: float | None = None  # the word confidence the answers come with
        self.log: list[tuple[int, Decision]] = []

    @property
    def frame(self) -> int:
        return self.policy.frames_seen - 1

    def feed(self, speech: bool, ms: int) -> list[Decision]:
        out: list[Decision] = []
        for _ in range(ms // FRAME_MS):
            t = self.policy.frames_seen * FRAME_MS * MS
            pending = self.policy.frame(speech, t)
            while pending:
                d = pending.pop(0)
                self.log.append((self.frame, d))
                out.append(d)
                if isinstance(d, CheckBurst) and self.hear is not None:
                    pending += self.policy.burst_heard(
                        d.check_id, self.hear(d.first_frame, d.end_frame), self.confidence
                    )
        return out

    def first(self, kind: type) -> tuple[int, Decision]:
        return next((f, d) for f, d in self.log if isinstance(d, kind))


def responding(td: TurnDetection) -> Driver:
    """A policy whose user turn ended and whose reply is playing."""
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(False, 200)
    drv.feed(True, 1000)
    drv.policy.partial("What's the weather like in Paris today?")
    drv.feed(False, td.max_silence_ms)
    assert drv.policy.phase is Phase.RESPONDING
    drv.policy.reply_started()
    drv.policy.reply_audible()
    drv.log.clear()
    return drv


def spoken(td: TurnDetection) -> tuple[Driver, int]:
    """A policy in a user turn after one second of speech, and the last speech frame."""
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(False, 400)
    drv.feed(True, 1000)
    return drv, drv.frame


def test_a_transcript_that_arrives_after_min_silence_ends_the_turn_when_it_arrives():
    td = TurnDetection(min_silence_ms=300, pause_ms=160)
    drv, last_speech = spoken(td)
    assert [type(d) for d in drv.feed(False, 160)] == [Speculate, Pause]
    # The pause's decode is late: the silence runs past min_silence_ms with nothing to read.
    assert drv.feed(False, 200) == []
    assert drv.frame - last_speech == 18
    assert [type(d) for _, d in drv.log] == [StartTurn, Speculate, Pause]
    # A doubtful end does not end it.
    assert drv.policy.partial("Book a table for two.", CONFIDENT_END - 0.01, 1) == []
    arrived = (drv.frame * 20 + 7) * MS  # between two frames
    decisions = drv.policy.partial("Book a table for two.", CONFIDENT_END, arrived)
    assert decisions == [EndTurn(t_ns=arrived, t_speech_end_ns=last_speech * 20 * MS)]
    assert drv.policy.phase is Phase.RESPONDING
    assert drv.feed(False, 100) == []


@pytest.mark.parametrize("silence_ms", [140, 200, 280])
def test_a_transcript_that_arrives_before_min_silence_ends_the_turn_at_it(silence_ms: int):
    td = TurnDetection(min_silence_ms=300, pause_ms=min(silence_ms, 160))
    drv, last_speech = spoken(td)
    drv.feed(False, silence_ms)
    assert drv.policy.partial("Book a table for two.", 0.9, (drv.frame * 20 + 7) * MS) == []
    assert drv.policy.phase is Phase.USER_TURN
    drv.feed(False, 2000)
    end_frame, end = drv.first(EndTurn)
    assert end_frame - last_speech == 300 // FRAME_MS
    assert isinstance(end, EndTurn) and end.t_ns == end_frame * 20 * MS


@pytest.mark.parametrize("min_silence_ms", [200, 300, 500, 840])
def test_a_complete_turn_ends_after_exactly_min_silence(min_silence_ms: int):
    td = TurnDetection(min_silence_ms=min_silence_ms, pause_ms=160, speculate_ms=40)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(False, 400)
    drv.feed(True, 60)
    start_frame, start = drv.first(StartTurn)
    # 60 ms of speech starts the turn on its third frame, with 240 ms of pre-roll.
    assert start_frame == 22
    assert start == StartTurn(first_frame=23 - PRE_ROLL_MS // FRAME_MS, t_ns=22 * 20 * MS)
    drv.feed(True, 1000)
    last_speech = drv.frame
    drv.policy.partial("Book a table for two.")
    drv.feed(False, 2000)
    end_frame, end = drv.first(EndTurn)
    assert end_frame - last_speech == min_silence_ms // FRAME_MS
    assert isinstance(end, EndTurn) and end.t_speech_end_ns == last_speech * 20 * MS
    assert (end.t_ns - end.t_speech_end_ns) // MS == min_silence_ms
    pause_frame, _ = drv.first(Pause)
    assert pause_frame - last_speech == 160 // FRAME_MS
    speculate_frame, _ = drv.first(Speculate)
    assert speculate_frame - last_speech == 40 // FRAME_MS
    assert [type(d) for _, d in drv.log] == [StartTurn, Speculate, Pause, EndTurn]


@pytest.mark.parametrize(
    "partial",
    ["I'd like to book...", "I'd like to book a.", "I'd like to book a table for", "", "Um"],
)
def test_an_unfinished_sentence_waits_for_max_silence(partial: str):
    td = TurnDetection(min_silence_ms=300, max_silence_ms=1100)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(True, 800)
    last_speech = drv.frame
    drv.policy.partial(partial)
    drv.feed(False, 3000)
    end_frame, _ = drv.first(EndTurn)
    assert end_frame - last_speech == 1100 // FRAME_MS


@pytest.mark.parametrize(
    ("confidence", "waits_ms"),
    [
        (None, 300), (0.95, 300), (0.61, 300), (0.6, 300),
        (0.59, 1100), (0.45, 1100), (0.35, 1100), (0.2, 1100),
    ],
)  # fmt: skip
def test_a_finished_sentence_the_recognizer_doubts_waits_for_max_silence(
    confidence: float | None, waits_ms: int
):
    assert CONFIDENT_END == 0.6  # the cases are fixed on both sides of it
    td = TurnDetection(min_silence_ms=300, max_silence_ms=1100)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(True, 800)
    last_speech = drv.frame
    drv.policy.partial("I want to fly from Boston.", confidence)
    drv.feed(False, 3000)
    end_frame, _ = drv.first(EndTurn)
    assert end_frame - last_speech == waits_ms // FRAME_MS


@pytest.mark.parametrize(
    ("partial", "confidence", "waits_ms"),
    [
        # Whisper's "Hello world!" decoded at the pause (the real 8 kHz recording: 0.346).
        ("Hello World...", 0.346, 300), ("Hello World...", 0.31, 300),
        ("Hello World…", 0.5, 300), ("No...", 0.408, 300),
        ("Hello World...", 0.29, 1100), ("Hello World...", 0.25, 1100),
        ("Hello World...", 0.1, 1100), ("Hello World...", None, 1100),
        # Words before the ellipsis that leave the sentence hanging, or a value dictated.
        ("Can you remind me to...", 0.9, 1100), ("The meeting is on...", 0.9, 1100),
        ("Um...", 0.9, 1100), ("My code is 4 5...", 0.9, 1100),
        # No mark at all: nothing says the speaker stopped.
        ("Hello World", None, 1100),
    ],
)  # fmt: skip
def test_a_transcript_that_trails_off_ends_the_turn_only_on_the_recognizers_word(
    partial: str, confidence: float | None, waits_ms: int
):
    assert TRAILING_END == 0.3  # the cases are fixed on both sides of it
    td = TurnDetection(min_silence_ms=300, max_silence_ms=1100)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(True, 800)
    last_speech = drv.frame
    drv.policy.partial(partial, confidence)
    drv.feed(False, 3000)
    end_frame, _ = drv.first(EndTurn)
    assert end_frame - last_speech == waits_ms // FRAME_MS


def test_the_doubt_is_the_latest_transcripts_own():
    td = TurnDetection(min_silence_ms=300, max_silence_ms=1100)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(True, 800)
    drv.policy.partial("I want to fly from Boston.", 0.2)
    drv.feed(False, 200)
    drv.feed(True, 600)
    last_speech = drv.frame
    drv.policy.partial("I want to fly from Boston to New York.", 0.9)
    drv.feed(False, 3000)
    end_frame, _ = drv.first(EndTurn)
    assert end_frame - last_speech == 300 // FRAME_MS


def test_a_pause_then_more_speech_resumes_the_same_turn():
    td = TurnDetection(speculate_ms=40)
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(True, 600)
    drv.policy.partial("I'd like to book.")
    drv.feed(False, 200)  # past pause_ms (160), short of min_silence_ms (300)
    drv.feed(True, 600)
    kinds = [type(d) for _, d in drv.log]
    assert kinds == [StartTurn, Speculate, Pause, Resume]
    assert drv.policy.phase is Phase.USER_TURN


@pytest.mark.parametrize(
    ("speculate_ms", "gap_ms", "expected"),
    [
        # Speech again after the early decode and before the pause: the reply on it is dropped.
        (40, 100, [StartTurn, Speculate, Resume]),
        (100, 100, [StartTurn, Speculate, Resume]),
        (120, 100, [StartTurn]),  # the gap is shorter than speculate_ms: nothing to drop
        (None, 100, [StartTurn]),  # no early decode
        (160, 200, [StartTurn, Pause, Resume]),  # not before pause_ms (160): none either
        (200, 200, [StartTurn, Pause, Resume]),
    ],
)
def test_the_early_decode_comes_once_before_the_pause_and_speech_drops_it(
    speculate_ms: int | None, gap_ms: int, expected: list[type]
):
    drv = Driver(TurnTakingPolicy(TurnDetection(speculate_ms=speculate_ms)))
    drv.feed(True, 600)
    last_speech = drv.frame
    drv.feed(False, gap_ms)
    drv.feed(True, 600)
    assert [type(d) for _, d in drv.log] == expected
    if Speculate in expected:
        assert speculate_ms is not None
        frame, decision = drv.first(Speculate)
        assert frame - last_speech == speculate_ms // FRAME_MS
        assert decision == Speculate(t_ns=frame * 20 * MS, t_speech_end_ns=last_speech * 20 * MS)


def test_the_early_decode_does_not_decide_the_end_of_turn():
    # The end of turn waits for the pause's transcript: a Speculate reads nothing.
    drv = Driver(TurnTakingPolicy(TurnDetection(speculate_ms=40)))
    drv.feed(True, 600)
    drv.feed(False, 300)
    assert [type(d) for _, d in drv.log] == [StartTurn, Speculate, Pause]
    assert drv.feed(False, 20) == []  # min_silence_ms passed: still no transcript to read
    # The pause's transcript ends the turn the moment it comes.
    assert [type(d) for d in drv.policy.partial("Book a table for two.", 0.9)] == [EndTurn]


def test_the_early_decode_comes_after_40_ms_of_silence_by_default():
    drv = Driver(TurnTakingPolicy(TurnDetection()))
    drv.feed(True, 600)
    assert drv.feed(False, 20) == []
    assert [type(d) for d in drv.feed(False, 20)] == [Speculate]
    assert drv.feed(False, 100) == []
    assert [type(d) for d in drv.feed(False, 20)] == [Pause]
    drv.feed(True, 600)
    assert [type(d) for _, d in drv.log] == [StartTurn, Speculate, Pause, Resume]


def test_no_early_decode_when_speculate_ms_is_none():
    drv = Driver(TurnTakingPolicy(TurnDetection(speculate_ms=None)))
    drv.feed(True, 600)
    drv.feed(False, 200)
    drv.feed(True, 600)
    assert [type(d) for _, d in drv.log] == [StartTurn, Pause, Resume]


def test_speculate_ms_must_be_positive():
    with pytest.raises(ValueError, match="speculate_ms"):
        TurnDetection(speculate_ms=0)


def test_speech_shorter_than_min_speech_starts_nothing():
    drv = Driver(TurnTakingPolicy(TurnDetection(min_speech_ms=100)))
    for _ in range(20):
        drv.feed(True, 80)
        drv.feed(False, 40)
    assert drv.log == []


def test_an_interruption_that_starts_with_a_filler_is_re_decided_as_it_grows():
    td = TurnDetection()
    drv = responding(td)
    burst_start = drv.policy.frames_seen
    drv.feed(True, td.barge_in_ms)
    frame, check = drv.first(CheckBurst)
    assert frame == burst_start + td.barge_in_ms // FRAME_MS - 1
    assert isinstance(check, CheckBurst)
    assert check.first_frame == burst_start - PRE_ROLL_MS // FRAME_MS
    assert check.end_frame == frame + 1
    # The first 200 ms are only "Um": no decision yet, the burst goes on.
    assert drv.policy.burst_heard(check.check_id, "Um,") == []
    drv.log.clear()
    drv.feed(True, 280)
    assert drv.log == []  # 300 ms of growth are needed before hearing it again
    drv.feed(True, 20)
    (_, again), *_ = drv.log
    assert isinstance(again, CheckBurst) and again.first_frame == check.first_frame
    decisions = drv.policy.burst_heard(again.check_id, "Um, wait, stop")
    assert decisions == [Interrupt(check.first_frame, drv.frame * 20 * MS, "Um, wait, stop")]
    assert drv.policy.phase is Phase.USER_TURN


@pytest.mark.parametrize(
    ("confidence", "interrupts"),
    # Fixed values on both sides of the bar ("Okay, got it." was heard as "Okay, okay, bye" at 0.41).
    [(None, True), (0.9, True), (0.45, True), (0.44, False), (0.41, False), (0.12, False)],
)
def test_words_the_recognizer_could_not_make_out_do_not_interrupt_yet(
    confidence: float | None, interrupts: bool
):
    # "Mm-hmm" heard as "Imam." on one window: not clear enough to stop the agent on.
    td = TurnDetection()
    drv = responding(td)
    drv.feed(True, td.barge_in_ms)
    _, check = drv.first(CheckBurst)
    assert isinstance(check, CheckBurst)
    decisions = drv.policy.burst_heard(check.check_id, "Imam.", confidence)
    assert [type(d) for d in decisions] == ([Interrupt] if interrupts else [])


def test_an_unclear_hearing_waits_for_the_next_one_and_the_burst_end_decides():
    td = TurnDetection()
    drv = responding(td)
    drv.feed(True, td.barge_in_ms)
    _, check = drv.first(CheckBurst)
    assert isinstance(check, CheckBurst)
    assert drv.policy.burst_heard(check.check_id, "And I'm...", 0.25) == []
    drv.log.clear()
    drv.feed(True, 300)
    (_, again), *_ = drv.log
    assert isinstance(again, CheckBurst)
    # The whole burst, heard again, is an acknowledgement.
    assert drv.policy.burst_heard(again.check_id, "Mm-hmm.", 0.5) == []
    drv.log.clear()
    drv.feed(False, 600)
    assert [type(d) for _, d in drv.log] == [BackChannel, ReleaseReply]


def test_a_backchannel_is_decided_only_once_the_burst_has_ended():
    td = TurnDetection()
    drv = responding(td)
    start = drv.policy.frames_seen
    # "okay" (300 ms), 200 ms pause, "okay" (200 ms): the transcript covers what was said so far.
    drv.hear = lambda first, end: "Okay," if end <= start + 25 else "Okay, okay."
    drv.feed(True, 300)
    drv.feed(False, 200)
    drv.feed(True, 200)
    drv.feed(False, 580)
    checks = [(f, d) for f, d in drv.log if isinstance(d, CheckBurst)]
    # Heard at 200 ms of speech, then each time the burst grew by 300 ms, never decided early.
    assert [d.end_frame - start for _, d in checks] == [10, 25, 40]
    assert all(not isinstance(d, BackChannel | Interrupt) for _, d in drv.log)
    drv.log.clear()
    drv.feed(False, 20)  # 600 ms of silence end the burst; the last check heard all of it
    t = drv.frame * FRAME_MS * MS
    # The reply paused at the burst's onset plays on from there.
    assert [d for _, d in drv.log] == [BackChannel("Okay, okay."), ReleaseReply(t)]
    assert not drv.policy.holding
    assert drv.policy.phase is Phase.RESPONDING


def test_a_burst_still_undecided_when_the_reply_ends_becomes_the_next_turn():
    td = TurnDetection()
    drv = responding(td)
    burst_start = drv.policy.frames_seen
    drv.feed(True, 220)
    _, check = drv.first(CheckBurst)
    assert isinstance(check, CheckBurst)
    decisions = drv.policy.reply_ended()
    assert decisions == [
        ReleaseReply(drv.frame * 20 * MS),
        StartTurn(burst_start - PRE_ROLL_MS // FRAME_MS, drv.frame * 20 * MS, deferred=True),
    ]
    # The late answer about the old burst changes nothing.
    assert drv.policy.burst_heard(check.check_id, "Okay, but") == []
    assert drv.policy.phase is Phase.USER_TURN


def test_without_interrupt_response_speech_waits_for_the_reply_to_end():
    td = TurnDetection(interrupt_response=False)
    drv = responding(td)
    drv.feed(False, 400)
    first_speech = drv.policy.frames_seen
    drv.feed(True, 1500)
    drv.feed(False, 300)
    drv.feed(True, 500)
    drv.feed(False, 2000)
    assert drv.log == []  # nothing interrupts, nothing is checked
    decisions = drv.policy.reply_ended()
    start = StartTurn(
        first_speech + td.min_speech_ms // FRAME_MS - PRE_ROLL_MS // FRAME_MS,
        drv.frame * 20 * MS,
        deferred=True,
    )
    assert decisions == [start]
    # The silence since the user stopped already counts towards the end of that turn.
    drv.policy.partial("No, I meant next Friday.")
    assert [type(d) for d in drv.feed(False, 20)] == [Pause, EndTurn]


def ended_mid_sentence(td: TurnDetection) -> tuple[Driver, int]:
    """A turn whose transcript at a pause read as finished: it ended, its reply not yet heard."""
    drv = Driver(TurnTakingPolicy(td))
    drv.feed(False, 400)
    drv.feed(True, 800)
    drv.policy.partial("I'd like to vote.")  # "I'd like to book", misheard at the pause
    drv.feed(False, td.min_silence_ms)
    _, start = drv.first(StartTurn)
    assert isinstance(start, StartTurn)
    assert drv.policy.phase is Phase.RESPONDING
    drv.log.clear()
    return drv, start.first_frame


@pytest.mark.parametrize("interrupt_response", [True, False])
@pytest.mark.parametrize("min_speech_ms", [20, 60, 100])
def test_speech_before_the_reply_is_heard_continues_the_same_turn(
    interrupt_response: bool, min_speech_ms: int
):
    td = TurnDetection(interrupt_response=interrupt_response, min_speech_ms=min_speech_ms)
    drv, turn_first = ended_mid_sentence(td)
    drv.policy.reply_started()  # the reply is being prepared, nothing of it played yet
    drv.feed(False, 280)  # the rest of a 600 ms pause
    drv.feed(True, min_speech_ms - 20)
    assert drv.log == []
    drv.feed(True, 20)
    # Exactly min_speech_ms of speech: the turn goes on from its own first frame.
    assert drv.log == [(drv.frame, ContinueTurn(turn_first, drv.frame * 20 * MS))]
    assert drv.policy.phase is Phase.USER_TURN
    drv.feed(True, 1000)
    last_speech = drv.frame
    drv.policy.partial("I'd like to book a table for two at seven.")
    drv.feed(False, 2000)
    end_frame, _ = drv.first(EndTurn)
    assert end_frame - last_speech == td.min_silence_ms // FRAME_MS
    # The withdrawn reply cannot hand a turn back: the continued turn is the only one.
    assert drv.policy.turn_dropped() == []


def test_speech_after_the_reply_is_heard_is_a_burst_not_a_continuation():
    td = TurnDetection()
    drv, _ = ended_mid_sentence(td)
    drv.policy.reply_started()
    drv.policy.reply_audible()
    drv.feed(True, td.barge_in_ms)
    assert [type(d) for _, d in drv.log] == [HoldReply, CheckBurst]


def test_an_injected_reply_has_no_turn_to_continue():
    td = TurnDetection()
    drv = Driver(TurnTakingPolicy(td))
    drv.policy.reply_started()  # a greeting, from listening
    drv.feed(True, td.barge_in_ms)
    assert [type(d) for _, d in drv.log] == [HoldReply, CheckBurst]


def test_after_an_empty_turn_is_dropped_speech_starts_a_new_turn():
    td = TurnDetection()
    drv, _ = ended_mid_sentence(td)
    assert drv.policy.turn_dropped() == []
    assert drv.policy.phase is Phase.LISTENING
    drv.feed(True, td.min_speech_ms)
    assert [type(d) for _, d in drv.log] == [StartTurn]


def test_silence_during_a_reply_hands_the_floor_back():
    drv = responding(TurnDetection())
    drv.feed(False, 3000)
    assert drv.policy.reply_ended() == []
    assert drv.policy.phase is Phase.LISTENING


def test_a_short_click_during_a_reply_is_nothing():
    td = TurnDetection()
    drv = responding(td)
    start = drv.policy.frames_seen
    drv.feed(True, td.barge_in_ms - 20)
    drv.feed(False, 1000)
    # Paused at the onset (HOLD_MS of speech), played on once the burst ended as nothing.
    hold = start + HOLD_MS // FRAME_MS - 1
    release = start + (td.barge_in_ms - 20 + BURST_END_MS) // FRAME_MS - 1
    assert drv.log == [
        (hold, HoldReply(hold * FRAME_MS * MS)),
        (release, ReleaseReply(release * FRAME_MS * MS)),
    ]
    assert drv.policy.reply_ended() == []


def test_pauses_that_end_in_a_resume_need_more_speech_each_time_and_then_stop():
    # A reply's own echo (no echo cancellation) pauses it, goes quiet, and would pause it
    # again for ever: each resume doubles the speech the next pause needs, and after
    # MAX_RESUMES the reply is not paused again.
    td = TurnDetection()
    drv = responding(td)
    starts = []
    for _ in range(MAX_RESUMES + 2):
        starts.append(drv.policy.frames_seen)
        drv.feed(True, td.barge_in_ms - 20)  # each burst too short to be anything
        drv.feed(False, 1000)
    holds = [frame for frame, d in drv.log if isinstance(d, HoldReply)]
    releases = [d for _, d in drv.log if isinstance(d, ReleaseReply)]
    need = [HOLD_MS << n for n in range(MAX_RESUMES)]
    assert need == [40, 80, 160] and td.barge_in_ms - 20 >= need[-1]
    assert holds == [start + ms // FRAME_MS - 1 for start, ms in zip(starts, need, strict=False)]
    assert len(releases) == MAX_RESUMES
    assert not drv.policy.holding


def test_the_reply_pauses_at_hold_ms_of_speech_and_an_interruption_cuts_it():
    td = TurnDetection()
    drv = Driver(TurnTakingPolicy(td, hold_ms=100), hear=lambda _f, _e: "Wait, stop.")
    drv.policy.reply_started()
    start = drv.policy.frames_seen
    drv.feed(True, 80)
    assert drv.log == []
    drv.feed(True, 20)
    assert drv.log == [(start + 4, HoldReply((start + 4) * FRAME_MS * MS))]
    assert drv.policy.holding
    drv.feed(True, td.barge_in_ms - 100)
    assert [type(d) for _, d in drv.log] == [HoldReply, CheckBurst, Interrupt]
    # The interruption cuts the held reply: nothing is released.
    assert not drv.policy.holding
    drv.feed(False, 2000)
    assert not any(isinstance(d, ReleaseReply) for _, d in drv.log)


def test_without_hold_ms_the_reply_is_never_paused():
    td = TurnDetection()
    drv = Driver(TurnTakingPolicy(td, hold_ms=None), hear=lambda _f, _e: "Mm-hmm.")
    drv.policy.reply_started()
    drv.feed(True, 400)
    drv.feed(False, 1000)
    assert [type(d) for _, d in drv.log] == [CheckBurst, CheckBurst, BackChannel]


def test_without_interrupt_response_the_reply_is_never_paused():
    drv = Driver(TurnTakingPolicy(TurnDetection(interrupt_response=False)))
    drv.policy.reply_started()
    drv.feed(True, 1000)
    assert drv.log == []
    assert not drv.policy.holding


@pytest.mark.parametrize(
    ("text", "meaning"),
    [
        # PROTOCOL §3.7: back-channels ...
        ("Uh-huh.", "backchannel"),
        ("Okay", "backchannel"),
        ("mm-hmm", "backchannel"),
        ("Ha ha ha!", "backchannel"),
        ("Hahaha.", "backchannel"),
        ("Heh heh.", "backchannel"),
        ("Ha, no, the other one.", "words"),
        ("Yeah, makes sense.", "backchannel"),
        ("Okay, okay.", "backchannel"),
        ("Yeah yeah yeah", "backchannel"),
        ("Right. Got it.", "backchannel"),
        ("Gotcha.", "backchannel"),
        ("Okay, gotcha.", "backchannel"),
        ("Gotcha, but why?", "words"),
        # ... and true interruptions.
        ("Wait, stop.", "words"),
        ("Hold on.", "words"),
        ("Sorry, that's not right.", "words"),
        ("Um, wait, stop, that's not what I asked.", "words"),
        ("Okay, but I meant the other one.", "words"),
        ("Uh, no.", "words"),
        # Numbers and names answer something.
        ("1 2 3 4", "words"),
        ("4572", "words"),
        ("Seven.", "words"),
        ("John.", "words"),
        ("", "nothing"),
        (" ... ", "nothing"),
        # Sounds as Whisper writes them: drawn out, spelled letter by letter, annotated.
        ("A-H-H-H-H-H-H-", "backchannel"),
        ("Uh-h-h-h-h-", "backchannel"),
        ("M-M-N-N-N-N-N-", "backchannel"),
        ("MMM.", "backchannel"),
        ("Hmmm, ahh.", "backchannel"),
        ("Uh huh, yeah.", "backchannel"),
        ("(laughs)", "nothing"),
        ("[Music]", "nothing"),
        ("*coughs*", "nothing"),
        ("\u266a", "nothing"),
        ("(laughs) Okay.", "backchannel"),
        ("(laughs) Wait.", "words"),
        # Continuers hand the floor back ...
        ("Go ahead.", "backchannel"),
        ("Go on.", "backchannel"),
        ("Okay, carry on.", "backchannel"),
        # ... other words, and sounds that ask or refuse, take it.
        ("Go back.", "words"),
        ("Uh-uh.", "words"),
        ("Huh?", "words"),
        ("Hi.", "words"),
        ("No.", "words"),
        ("Hmm, no.", "words"),
        ("In a month.", "words"),
        ("Home.", "words"),
    ],
)
def test_what_a_burst_means(text: str, meaning: str):
    assert classify(text) == meaning
    assert is_backchannel(text) is (meaning != "words")


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("Book a table for two.", True),
        ("What time is it?", True),
        ("Stop!", True),
        ("I'd like to book...", False),
        ("I'd like to book\u2026", False),
        ("I'd like to book a.", False),
        ("My order number is", False),
        ("Can you remind me to call my sister and.", False),
        ("My code is 4 5.", False),
        ("The number is 555.", False),
        ("My name is J, O.", False),
        ("It costs twenty dollars.", True),
        ("", False),
    ],
)
def test_what_reads_complete(text: str, complete: bool):
    assert reads_complete(text) is complete


@pytest.mark.parametrize(
    ("text", "claims"),
    [
        ("I...", False),  # may still become "I see"
        ("I", False),
        ("Yeah, makes", False),  # may still become "yeah, makes sense"
        ("Ri...", False),  # cut mid-word: may be "right"
        ("Mm-", False),
        ("MMM.", False),
        ("Wait...", True),  # no acknowledgement starts so
        ("Sorry...", True),
        ("Yeah, but what about...", True),
        ("Um, wait.", True),
        ("1 2", True),
        ("Okay, but", True),
    ],
)
def test_what_a_burst_still_going_on_claims(text: str, claims: bool):
    assert claims_the_floor_so_far(text) is claims


def test_a_word_that_may_become_an_acknowledgement_waits_for_the_next_hearing():
    td = TurnDetection()
    drv = responding(td)
    start = drv.policy.frames_seen
    drv.hear = lambda first, end: "I..." if end <= start + 20 else "I mean, no."
    drv.feed(True, 400)
    drv.feed(False, 1000)
    interrupts = [(f, d) for f, d in drv.log if isinstance(d, Interrupt)]
    checks = [d.end_frame - start for _, d in drv.log if isinstance(d, CheckBurst)]
    assert checks == [10, 25]  # at 200 ms of speech, then 300 ms later
    assert interrupts == [
        (
            start + 24,
            Interrupt(start - PRE_ROLL_MS // FRAME_MS, (start + 24) * 20 * MS, "I mean, no."),
        )
    ]


def test_a_burst_that_ends_on_words_interrupts_when_it_ends():
    td = TurnDetection()
    drv = responding(td)
    start = drv.policy.frames_seen
    drv.hear = lambda first, end: "I."  # may have become "I see": decided at the end
    drv.feed(True, 400)
    drv.feed(False, 580)
    assert not any(isinstance(d, Interrupt) for _, d in drv.log)
    drv.feed(False, 20)
    interrupts = [(f, d) for f, d in drv.log if isinstance(d, Interrupt)]
    frame = start + (400 + 600) // FRAME_MS - 1
    assert interrupts == [
        (frame, Interrupt(start - PRE_ROLL_MS // FRAME_MS, frame * 20 * MS, "I."))
    ]


def said_over_the_reply(
    speech_ms: int, text: str, confidence: float | None, unclear_short_ms: int = UNCLEAR_SHORT_MS
) -> list[type]:
    """The decisions on a burst of ``speech_ms`` over the reply, every hearing of it ``text``."""
    drv = responding(TurnDetection())
    drv.policy = TurnTakingPolicy(drv.policy.td, unclear_short_ms=unclear_short_ms)
    drv.policy.reply_started()
    drv.hear = lambda _first, _end: text
    drv.confidence = confidence
    drv.feed(True, speech_ms)
    drv.feed(False, BURST_END_MS + 200)
    kinds = (HoldReply, BackChannel, ReleaseReply, Interrupt)  # not the turn that follows
    return [type(d) for _, d in drv.log if isinstance(d, kinds)]


@pytest.mark.parametrize(
    ("speech_ms", "text", "confidence", "decisions"),
    [
        # A hummed "Mm-hmm" Whisper writes as words it is unsure of: a sound.
        (UNCLEAR_SHORT_MS, "In a month.", CLEAR_WORDS - 0.01, [BackChannel, ReleaseReply]),
        (300, "MMO", 0.18, [BackChannel, ReleaseReply]),
        # A hummed "Mhm." written "and may come." (560 ms of speech, 0.43): a sound. Fixed values
        # on both sides of both bars.
        (600, "and may come.", 0.44, [BackChannel, ReleaseReply]),
        (620, "and may come.", 0.44, [Interrupt]),
        (600, "and may come.", 0.45, [Interrupt]),
        # Longer, heard clearly, with no confidence given, or with a word that stops a
        # speaker on its own: words.
        (UNCLEAR_SHORT_MS + FRAME_MS, "In a month.", CLEAR_WORDS - 0.01, [Interrupt]),
        (UNCLEAR_SHORT_MS, "In a month.", CLEAR_WORDS, [Interrupt]),
        (UNCLEAR_SHORT_MS, "In a month.", None, [Interrupt]),
        (UNCLEAR_SHORT_MS, "uh wait", 0.3, [Interrupt]),
        (300, "No.", 0.2, [Interrupt]),
        (300, "Hold on.", 0.2, [Interrupt]),
    ],
)
def test_unclear_words_of_a_short_burst_are_a_sound_unless_they_claim_the_floor(
    speech_ms: int, text: str, confidence: float | None, decisions: list[type]
):
    assert said_over_the_reply(speech_ms, text, confidence) == [HoldReply, *decisions]


def test_with_unclear_short_ms_0_unclear_words_interrupt():
    got = said_over_the_reply(300, "In a month.", 0.2, unclear_short_ms=0)
    assert got == [HoldReply, Interrupt]
