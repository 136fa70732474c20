"""The soak's accounting: user turns and their outcome, and the least-squares memory drift."""

from __future__ import annotations

from runtime.bench.soak import Seen, drift, turns


def test_turns_and_their_outcomes() -> None:
    seen = [
        Seen(0.0, "session.ready"),
        Seen(1.0, "transcript.user", "item_1"),
        Seen(1.5, "reply.started"),
        Seen(2.0, "reply.done", "completed"),
        Seen(3.0, "transcript.user", "item_2"),
        Seen(3.5, "reply.error", "timeout"),
        Seen(3.6, "reply.done", "failed"),
        # The user speaks again before any reply began: the next reply answers both.
        Seen(5.0, "transcript.user", "item_3"),
        Seen(6.0, "transcript.user", "item_4"),
        # A reply withdrawn before any of its audio came: the user went on with the turn,
        # which is transcribed again as the same item (the same turn, continued).
        Seen(6.1, "reply.started", "", "r4a"),
        Seen(6.2, "reply.done", "interrupted", "r4a"),
        Seen(6.5, "transcript.user", "item_4"),
        Seen(7.0, "reply.started", "", "r4b"),
        Seen(7.1, "reply.audio", "", "r4b"),
        Seen(8.0, "reply.done", "interrupted", "r4b"),
        # A turn the session left without a reply: the socket dropped, the resume came
        # back and nothing answered it before the end.
        Seen(9.0, "transcript.user", "item_5"),
        Seen(9.5, "dropped", "1006"),
        Seen(10.0, "resumed"),
        Seen(10.0, "session.ready"),
        Seen(12.0, "session.ended"),
    ]
    found = turns(seen)
    assert [(t.item_id, t.t, t.outcome) for t in found] == [
        ("item_1", 1.0, "answered"),
        ("item_2", 3.0, "apologised"),
        ("item_3", 5.0, "superseded"),
        ("item_4", 6.0, "answered"),
        ("item_5", 9.0, "neither"),
    ]
    # What the server counts as turn metrics: replies on the connection that heard the turn,
    # the withdrawn one left out.
    assert [t.replies_here for t in found] == [1, 1, 0, 1, 0]
    assert [e.kind for e in found[-1].events] == [
        "dropped", "resumed", "session.ready", "session.ended",
    ]  # fmt: skip


def test_an_item_id_repeated_after_a_resume_is_a_new_turn() -> None:
    # A resumed session numbers its items afresh: the same id after session.ready is new.
    seen = [
        Seen(1.0, "transcript.user", "item_1"),
        Seen(2.0, "reply.started"),
        Seen(3.0, "reply.done", "completed"),
        Seen(4.0, "resumed"),
        Seen(4.0, "session.ready"),
        Seen(5.0, "transcript.user", "item_1"),
    ]
    assert [(t.t, t.outcome) for t in turns(seen)] == [(1.0, "answered"), (5.0, "neither")]


def test_drift_is_the_least_squares_slope_with_its_standard_error() -> None:
    # 1 KiB a second exactly: 3.6864 MB an hour, no error.
    exact = drift([(t, 1000.0 + t) for t in (0.0, 10.0, 20.0, 30.0)])
    assert (exact.mb_per_hour, exact.stderr_mb_per_hour, exact.samples, exact.span_s) == (
        3.7,
        0.0,
        4,
        30.0,
    )
    # Noisy: 0.4 KiB/s (1.5 MB/h) with a standard error of sqrt(3.2 / 2 / 5) KiB/s (2.1 MB/h),
    # a slope not told apart from none.
    noisy = drift([(0.0, 100.0), (1.0, 102.0), (2.0, 100.0), (3.0, 102.0)])
    assert (noisy.mb_per_hour, noisy.stderr_mb_per_hour) == (1.5, 2.1)
    assert drift([(0.0, 1.0), (1.0, 2.0)]).mb_per_hour is None
