"""Capacity levels: when a level holds, the capacity, the RSS slope and the tables."""

from __future__ import annotations

from runtime.bench.capacity import Criterion, Level, Run, failures, markdown, percentile, rss_slope


def level(sessions: int, **kw: object) -> Level:
    base: dict[str, object] = {
        "sessions": sessions, "expected_turns": 2, "user_turns": 2 * sessions,
        "answered": 2 * sessions, "errors": {}, "v2v_ms": [400.0, 500.0, 600.0],
        "pacing_p99_ms": [5.0] * sessions, "cpu_pct": 10.0 * sessions,
        "rss_mb": 120.0 + 2 * sessions, "machine_lag_ms": 1.0,
    }  # fmt: skip
    return Level(**(base | kw))  # type: ignore[arg-type]


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 11)], 90) == 9.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_a_level_holds_only_when_every_part_of_the_criterion_does():
    c = Criterion(pacing_p99_ms=20.0, v2v_factor=1.5)
    assert failures(level(4), 500.0, c) == []
    # Pacing is judged above the machine's own lag: 21 ms holds with 1 ms of it, 21.5 does not.
    assert failures(level(4, pacing_p99_ms=[3.0, 21.0]), 500.0, c) == []
    assert failures(level(4, pacing_p99_ms=[3.0, 21.5]), 500.0, c) == [
        "pacing p99 21.5 ms > 20 + 1 ms"
    ]
    assert failures(level(4, v2v_ms=[700.0, 760.0, 800.0]), 500.0, c) == [
        "v2v p50 760 ms > 1.5x 500 ms"
    ]
    assert failures(level(4, v2v_ms=[700.0, 750.0, 800.0]), 500.0, c) == []
    assert failures(level(4, answered=7, errors={"reply.error:llm_timeout": 1}), 500.0, c) == [
        "errors reply.error:llm_timeout x1",
        "1 of 8 turns unanswered",
    ]
    assert failures(level(2, v2v_ms=[], pacing_p99_ms=[]), None, c) == [
        "no paced audio",
        "no v2v sample",
    ]
    # The one-session level has no baseline to be judged against.
    assert failures(level(1, v2v_ms=[5000.0]), None, c) == []


def test_rss_slope_is_least_squares():
    assert rss_slope([(1, 120.0)]) is None
    assert rss_slope([(1, 120.0), (1, 130.0)]) is None
    assert rss_slope([(1, 100.0), (3, 104.0), (5, 108.0)]) == 2.0
    assert rss_slope([(1, 100.0), (2, 103.0), (3, 102.0)]) == 1.0


def test_capacity_stops_at_the_first_level_that_does_not_hold():
    c = Criterion()
    run = Run("remote", 1, idle_rss_mb=118.0)
    run.levels += [level(1), level(4), level(8, pacing_p99_ms=[40.0] * 8), level(16)]
    rows = run.rows(c)
    assert [r["holds"] for r in rows] == [True, True, False, True]
    assert run.capacity(c) == 4  # 16 held, but 8 did not
    assert [r["rss_per_session_mb"] for r in rows] == [None, 2.0, 2.0, 2.0]
    assert rows[2]["why_not"] == ["pacing p99 40 ms > 20 + 1 ms"]
    assert run.summary(c) == {
        "engines": "remote", "workers": 1, "capacity": 4, "at_least": False,
        "largest_held": 16, "per_worker": 4.0, "idle_rss_mb": 118.0,
        "rss_slope_mb_per_session": 2.0,
    }  # fmt: skip
    assert Run("embedded", 2, 300.0).capacity(c) == 0
    assert Run("embedded", 2, 300.0).summary(c)["at_least"] is False
    held = Run("embedded", 2, 300.0, [level(1), level(4)])
    assert (held.capacity(c), held.summary(c)["at_least"]) == (4, True)
    assert Run("embedded", 2, 300.0).summary(c)["largest_held"] == 0


def test_the_markdown_tables():
    c = Criterion()
    one = Run("remote", 1, 118.0, [level(1), level(4)])
    two = Run("remote", 2, 236.5, [level(1), level(4), level(8, errors={"failed:at_capacity": 2})])
    assert markdown([one, two], c) == (
        "| engines | workers | sessions | holds | server CPU % | RSS MiB | MiB/session | "
        "v2v p50 ms | v2v p90 ms | pacing p99 ms (worst) | idle lag p99 ms | "
        "underrun ms (worst) | turns answered | errors |\n"
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
        "| remote | 1 | 1 | yes | 10 | 122 | - | 500 | 600 | 5 | 1 | - | 2/2 | 0 |\n"
        "| remote | 1 | 4 | yes | 40 | 128 | 2 | 500 | 600 | 5 | 1 | - | 8/8 | 0 |\n"
        "| remote | 2 | 1 | yes | 10 | 122 | - | 500 | 600 | 5 | 1 | - | 2/2 | 0 |\n"
        "| remote | 2 | 4 | yes | 40 | 128 | 2 | 500 | 600 | 5 | 1 | - | 8/8 | 0 |\n"
        "| remote | 2 | 8 | no | 80 | 136 | 2 | 500 | 600 | 5 | 1 | - | 16/16 | "
        "failed:at_capacity x2 |\n"
        "\n"
        "| engines | workers | capacity (sessions) | per worker | largest level held | "
        "idle RSS MiB | RSS slope MiB/session | vs 1 worker |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|\n"
        "| remote | 1 | >= 4 | >= 4 | 4 | 118 | 2 | - |\n"
        "| remote | 2 | 4 | 2 | 4 | 236.5 | 2 | 1.00x |\n"
    )
